"""The sweep reporter (metaopt.report): rows, groups, mean curves, tables, CSV and figures, without Ray.

Each capability's printed table is pinned to the text it printed before the reporter existed (the strings below
were produced by the hand-written f-string tables of the five sweep.py files), so the summary a user reads
stays the same line for line."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest

from metaopt import report


# ---- rows ------------------------------------------------------------------------------------------------------
def test_trial_id_and_error_line_of_a_result():
    failed = SimpleNamespace(metrics={"trial_id": "abc_00001"}, path="/x/trial", error=RuntimeError("boom\ntrace"))
    silent = SimpleNamespace(metrics=None, path="/x/never_reported", error=None)
    assert report.trial_id(failed) == "abc_00001" and report.error_line(failed) == "boom"
    assert report.trial_id(silent) == "/x/never_reported" and report.error_line(silent) is None


def test_progress_curves_read_the_wanted_columns_of_progress_csv_as_floats(tmp_path):
    pd.DataFrame({"round": [1, 2, 3], "accuracy": [0.5, None, 0.7], "loss": [1.0, 0.9, 0.8]}).to_csv(
        tmp_path / "progress.csv", index=False
    )
    curves = report.progress_curves(SimpleNamespace(path=str(tmp_path)), {"round", "accuracy"}.__contains__)
    assert set(curves) == {"round", "accuracy"}
    assert curves["round"] == [1.0, 2.0, 3.0]
    assert curves["accuracy"][0] == 0.5 and math.isnan(curves["accuracy"][1]) and curves["accuracy"][2] == 0.7
    assert report.progress_curves(SimpleNamespace(path=str(tmp_path / "none")), lambda key: True) == {}


def test_measured_keeps_the_points_where_both_values_exist():
    xs, ys = report.measured([1, 2, math.nan, 4], [0.1, math.nan, 0.3, 0.4])
    assert (xs, ys) == ([1, 4], [0.1, 0.4])


def test_grouped_sorts_groups_and_keeps_row_order_within_one():
    rows = [
        {"s": "b", "lr": 0.1, "i": 0},
        {"s": "a", "lr": 0.1, "i": 1},
        {"s": "b", "lr": 0.1, "i": 2},
        {"s": "a", "lr": 0.01, "i": 3},
    ]
    groups = report.grouped(rows, lambda r: (r["s"], r["lr"]))
    assert list(groups) == [("a", 0.01), ("a", 0.1), ("b", 0.1)]
    assert [r["i"] for r in groups[("b", 0.1)]] == [0, 2]


def test_mean_curve_is_numpys_mean_over_the_common_length():
    rng = np.random.default_rng(0)
    ys = [rng.normal(size=n) for n in (7, 5, 6)]
    xs, mean = report.mean_curve([(np.arange(10, 10 + len(y)), y) for y in ys] + [([], [])])
    np.testing.assert_allclose(mean, np.mean([y[:5] for y in ys], axis=0))
    assert xs == [10, 11, 12, 13, 14]
    assert report.mean_curve([([], [])]) == ([], [])


def test_seed_std_is_the_sample_std_and_zero_for_one_seed():
    values = [0.5, 0.7, 0.65]
    assert report.seed_std(values) == pytest.approx(np.std(values, ddof=1))
    assert report.seed_std([0.4]) == 0.0
    assert math.isnan(report.seed_std([0.5, math.nan]))
    assert report.seed_std([0.5, math.nan, 0.7], skip_nan=True) == pytest.approx(np.std([0.5, 0.7], ddof=1))


# ---- tables and CSV ---------------------------------------------------------------------------------------------
def test_format_table_aligns_columns_under_a_rule_as_long_as_the_header():
    columns = (
        report.Column("name", 6, align="<"),
        report.Column("score", 8, ".2f"),
        report.Column("note", align="<", gap="  "),
    )
    text = report.format_table(columns, [["a", 0.123, "ok"], ["bb", 12.0, "BEST"]], notes=["(a note)"])
    assert text.splitlines() == [
        "name     score  note",
        "--------------------",
        "a         0.12  ok",
        "bb       12.00  BEST",
        "(a note)",
    ]
    with pytest.raises(ValueError, match="zip"):  # a row with a value too few is a bug, not a shorter line
        report.format_table(columns, [["a", 0.1]])


def test_csv_rows_and_write_csv_round_trip(tmp_path):
    rows = [
        {"trial_id": "t0", "lr": 0.1, "diverged": False, "extra": 1},
        {"trial_id": "t1", "lr": 1e-3, "diverged": True, "extra": 2},
    ]
    keys = ["trial_id", "lr", "diverged"]
    path = report.write_csv(tmp_path / "summary.csv", keys, report.csv_rows(rows, keys))
    assert list(csv.reader(path.open())) == [keys, ["t0", "0.1", "False"], ["t1", "0.001", "True"]]


def test_federated_table_is_the_one_it_printed_before():
    from metaopt.federated.sweep import format_table

    rows = [
        {"strategy": "fedavg", "lr": 0.1, "final_accuracy": 0.8, "best_accuracy": 0.85},
        {"strategy": "fedavg", "lr": 0.1, "final_accuracy": 0.7, "best_accuracy": 0.9},
        {"strategy": "fedadam", "lr": 0.01, "final_accuracy": 0.5, "best_accuracy": 0.55},
    ]
    assert format_table(rows) == (
        "strategy             lr0  seeds  final acc   ± std  best acc\n"
        "------------------------------------------------------------\n"
        "fedadam             0.01      1     0.5000  0.0000    0.5500\n"
        "fedavg               0.1      2     0.7500  0.0707    0.8750"
    )


def test_posttrain_table_is_the_one_it_printed_before():
    from metaopt.posttrain.sweep import format_table

    rows = [
        {"curriculum": "sec", "warmup_accuracy": 0.1, "final_accuracy": 0.5, "completions_per_s": 12.34},
        {"curriculum": "sec", "warmup_accuracy": 0.2, "final_accuracy": math.nan, "completions_per_s": 10.0},
        {"curriculum": "random", "warmup_accuracy": 0.1, "final_accuracy": 0.25, "completions_per_s": 9.0},
        {"curriculum": "random", "warmup_accuracy": 0.3, "final_accuracy": 0.45, "completions_per_s": 11.0},
    ]
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):  # one seed with a value: its spread is NaN
        text = format_table(rows)
    assert text == (
        "curriculum     seeds  warm-up acc  final acc   ± std  compl/s\n"
        "-------------------------------------------------------------\n"
        "random             2       0.2000     0.3500  0.1414     10.0\n"
        "sec                2       0.1500     0.5000     nan     11.2"
    )


def test_objectives_table_is_the_one_it_printed_before():
    from metaopt.objectives.sweep import format_table

    trial = SimpleNamespace
    summary = SimpleNamespace(
        best_trial="b",
        trials=[
            trial(
                trial_id="a",
                meta_seed=0,
                generations=3,
                fitness_mean=1.0123,
                start_mean_score=0.99,
                mean_score=1.05,
                error=None,
            ),
            trial(
                trial_id="b",
                meta_seed=1,
                generations=3,
                fitness_mean=1.1,
                start_mean_score=0.98,
                mean_score=1.2,
                error=None,
            ),
            trial(
                trial_id="c",
                meta_seed=2,
                generations=1,
                fitness_mean=math.nan,
                start_mean_score=math.nan,
                mean_score=math.nan,
                error="ValueError: boom",
            ),
        ],
    )
    assert format_table(summary) == (
        "trial            meta-seed generations   fitness start score  eval score  status\n"
        "--------------------------------------------------------------------------------\n"
        "b                        1           3     1.100       0.980       1.200  BEST\n"
        "a                        0           3     1.012       0.990       1.050  ok\n"
        "c                        2           1       nan         nan         nan  FAILED ValueError: boom\n"
        "(scores: final mean return normalised by PPO's on the same env and horizon; 1.0 = PPO's baseline seeds; "
        "start score = the ES mean at generation 0, i.e. PPO's objective, on the evaluation seeds)"
    )


def test_pbt_table_is_the_one_it_printed_before():
    from metaopt.pbt.sweep import format_table

    trial = SimpleNamespace
    summary = SimpleNamespace(
        metric="val_accuracy",
        mode="max",
        best_trial="t1",
        trials=[
            trial(
                trial_id="t0",
                final_metric=0.5,
                best_metric=0.6,
                final_lr=0.0123,
                steps=100,
                diverged=False,
                schedule=[(0, 0.01), (50, 0.0123)],
            ),
            trial(
                trial_id="t1",
                final_metric=0.9,
                best_metric=0.91,
                final_lr=0.1,
                steps=100,
                diverged=False,
                schedule=[(0, 0.1)],
            ),
            trial(
                trial_id="t2",
                final_metric=-math.inf,
                best_metric=math.nan,
                final_lr=3.0,
                steps=40,
                diverged=True,
                schedule=[(0, 3.0)],
            ),
        ],
    )
    assert format_table(summary) == (
        "trial             val_accuracy      best   final lr  steps  status    schedule (step:lr)\n"
        "----------------------------------------------------------------------------------------\n"
        "t1                      0.9000    0.9100        0.1    100  BEST      0:0.1\n"
        "t0                      0.5000    0.6000     0.0123    100  ok        0:0.01 -> 50:0.0123\n"
        "t2                        -inf       nan          3     40  diverged  0:3"
    )


# ---- figures ----------------------------------------------------------------------------------------------------
def test_a_figure_is_drawn_off_screen_labelled_saved_and_closed(tmp_path):
    import matplotlib.pyplot as plt

    fig, axes = report.figure(1, 2, size=(6, 3), squeeze=False)
    assert matplotlib.get_backend().lower() == "agg"
    assert axes.shape == (1, 2) and tuple(fig.get_size_inches()) == (6, 3)
    axes[0][0].plot([1, 2, 3], [1e-3, 1e-2, 1e-1], label="lr")
    report.label_axes(axes[0][0], x="round", y="lr", title="t", title_size=9, legend=7, log_y=True)
    ax = axes[0][0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("round", "lr", "t")
    assert ax.get_yscale() == "log" and ax.title.get_fontsize() == 9
    assert ax.get_legend().get_texts()[0].get_fontsize() == 7
    path = report.save_figure(fig, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
