"""The statistics of ``lpo_eval`` without its driver: Student-t intervals against scipy, table rows of finished
and failed trials, the per-cell metrics and CSV, the printed table's order; and no Ray or MLflow imported."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from metaopt.objectives.eval_stats import (
    CSV_HEADER,
    cell_metrics,
    confidence_interval,
    csv_rows,
    evaluation_row,
    format_table,
    return_summary,
)


def test_confidence_interval_matches_scipy():
    from scipy import stats

    values = np.array([10.0, 12.0, 9.0, 14.0, 11.0])
    mean, low, high = confidence_interval(values, 0.95)
    want = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(11.2) and (low, high) == pytest.approx(want)
    single = confidence_interval(np.array([3.0]), 0.95)
    assert single[0] == 3.0 and math.isnan(single[1]) and math.isnan(single[2])


def cell(objective: str, env: str, steps: int, returns: list[float] | None, error: str | None = None) -> dict:
    config = {"objective": {"label": objective}, "problem": {"env": env, "total_timesteps": steps}}
    metrics = return_summary(np.array(returns), 0.9) if returns is not None else None
    return evaluation_row(config, metrics, error)


def test_rows_metrics_and_csv_of_finished_and_failed_cells():
    ok = cell("mlflow:abc/1", "CartPole-v1", 1024, [10.0, 20.0, 30.0])
    assert ok["problem"] == "CartPole-v1_1024" and ok["returns"] == [10.0, 20.0, 30.0] and ok["error"] is None
    assert ok["mean"] == 20.0 and ok["std"] == pytest.approx(10.0) and ok["ci_low"] < 20.0 < ok["ci_high"]
    assert json.loads(return_summary(np.array([1.5, 2.5]), 0.95)["returns"]) == [1.5, 2.5]
    failed = cell("dpo", "CartPole-v1", 1024, None, error="RayTaskError: boom\ntraceback ...")
    assert math.isnan(failed["mean"]) and failed["returns"] == [] and failed["error"] == "RayTaskError: boom"

    metrics = cell_metrics([ok])
    assert set(metrics) == {f"mlflow_abc_1.CartPole-v1_1024.{s}" for s in ("mean", "ci_low", "ci_high")}
    assert metrics["mlflow_abc_1.CartPole-v1_1024.mean"] == 20.0
    header, *rows = csv_rows([ok, failed])
    assert tuple(header) == CSV_HEADER and [row[-1] for row in rows] == [3, 0]


def test_table_compares_within_each_problem_best_first_failed_last():
    table = [
        cell("ppo", "Pendulum-v1", 2048, [-300.0, -280.0]),
        cell("dpo", "CartPole-v1", 1024, [50.0, 60.0]),
        cell("broken", "CartPole-v1", 1024, None, error="ValueError: nan"),
        cell("ppo", "CartPole-v1", 1024, [80.0, 90.0]),
    ]
    lines = format_table(table, 0.95).splitlines()
    assert "95% interval" in lines[0]
    order = [(line.split()[0], line.split()[1]) for line in lines[2:]]
    assert order == [
        ("ppo", "CartPole-v1_1024"),
        ("dpo", "CartPole-v1_1024"),
        ("broken", "CartPole-v1_1024"),
        ("ppo", "Pendulum-v1_2048"),
    ]
    assert lines[4].endswith("FAILED ValueError: nan")


def test_statistics_import_neither_ray_nor_mlflow():
    code = (
        "import sys, metaopt.objectives.eval_stats; "
        "print(sorted(m for m in ('ray', 'mlflow', 'jax') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
