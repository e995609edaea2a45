"""The statistics of an ``lpo_eval`` run, apart from its Tune/MLflow driver (:mod:`metaopt.objectives.evaluate`):
a trial's summary of its per-seed returns (mean and Student-t confidence interval), one table row per
(objective, env x horizon) cell, the per-cell metric names, the CSV rows and the printed table, compared within
each env x horizon best first. numpy and scipy only: importable and tested without Ray or MLflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

CSV_HEADER = ("objective", "problem", "mean", "ci_low", "ci_high", "std", "seeds")
CELL_STATS = (("mean", "mean"), ("ci_low", "ci_low"), ("ci_high", "ci_high"))
"""(metric suffix, row key) of what is logged per cell: ``{objective}.{problem}.{suffix}``."""


def confidence_interval(values: np.ndarray, level: float) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t interval of the mean at ``level`` (NaN bounds for fewer than 2 values;
    :func:`metaopt.stats.mean_interval`)."""
    from metaopt.stats import mean_interval

    values = np.asarray(values, dtype=float).ravel()
    if np.isnan(values).any():  # a diverged seed makes the cell NaN (mean_interval would drop it)
        return math.nan, math.nan, math.nan
    interval = mean_interval(values, level)
    return interval.mean, interval.low, interval.high


def return_summary(returns: np.ndarray, level: float) -> dict[str, Any]:
    """What one evaluation trial reports of its per-seed final returns (the returns themselves as JSON text,
    which Tune and MLflow carry as one value)."""
    mean, low, high = confidence_interval(returns, level)
    return {
        "mean_return": mean,
        "ci_low": low,
        "ci_high": high,
        "std_return": float(np.std(returns, ddof=1)),
        "returns": json.dumps([float(r) for r in returns]),
    }


def problem_label(problem: Mapping[str, Any]) -> str:
    """An env x horizon cell's name: ``{env}_{total_timesteps}`` (a user env by its factory's name)."""
    from metaopt.objectives.ppo_settings import env_label

    return f"{env_label(problem['env'])}_{problem['total_timesteps']}"


def evaluation_row(config: Mapping[str, Any], metrics: Mapping[str, Any] | None, error: Any = None) -> dict[str, Any]:
    """A trial's row of the table from its config and last reported metrics (NaN / no returns when it failed;
    ``error``'s first line)."""
    metrics = metrics or {}
    return {
        "objective": config["objective"]["label"],
        "problem": problem_label(config["problem"]),
        "mean": float(metrics.get("mean_return", math.nan)),
        "ci_low": float(metrics.get("ci_low", math.nan)),
        "ci_high": float(metrics.get("ci_high", math.nan)),
        "std": float(metrics.get("std_return", math.nan)),
        "returns": json.loads(metrics["returns"]) if "returns" in metrics else [],
        "error": str(error).splitlines()[0] if error else None,
    }


def metric_key(row: Mapping[str, Any], stat: str) -> str:
    """The metric name of one statistic of one cell (the objective's label made metric-safe)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in row["objective"])
    return f"{safe}.{row['problem']}.{stat}"


def cell_metrics(table: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and interval bounds of every cell, by :func:`metric_key`."""
    return {metric_key(row, stat): row[key] for row in table for stat, key in CELL_STATS}


def csv_rows(table: list[dict[str, Any]]) -> list[list[Any]]:
    """The table as CSV rows, :data:`CSV_HEADER` first; ``seeds`` is the number of returns."""
    return [
        list(CSV_HEADER),
        *(
            [r["objective"], r["problem"], r["mean"], r["ci_low"], r["ci_high"], r["std"], len(r["returns"])]
            for r in table
        ),
    ]


def best_first_by_problem(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by env x horizon (in name order), within each the highest mean return first and failed
    (NaN) cells last: the order in which objectives compare."""
    return sorted(table, key=lambda r: (r["problem"], -r["mean"] if math.isfinite(r["mean"]) else math.inf))


def format_table(table: list[dict[str, Any]], confidence: float) -> str:
    """The printed table: one line per cell, :func:`best_first_by_problem`, a failed cell's error beside it."""
    header = f"{'objective':<28}{'env_steps':<28}{'mean return':>12}{f'{confidence:.0%} interval':>24}{'seeds':>7}"
    lines = [header, "-" * len(header)]
    for r in best_first_by_problem(table):
        interval = f"[{r['ci_low']:.1f}, {r['ci_high']:.1f}]"
        status = f"  FAILED {r['error']}" if r["error"] else ""
        lines.append(
            f"{r['objective'][:27]:<28}{r['problem']:<28}{r['mean']:>12.2f}{interval:>24}{len(r['returns']):>7}{status}"
        )
    return "\n".join(lines)
