"""The fixed-lr baselines' ``lr_schedule: cosine``: the tuned cosine schedule PBT is compared with (issue 23, R1)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import optax
import pytest

from metaopt.errors import ConfigError
from metaopt.pbt import plots, sweep
from metaopt.pbt.lineage import trial_schedule
from metaopt.pbt.replay import replay_schedule
from metaopt.pbt.sweep import SweepSummary, format_table, summarise_trials
from test_pb2_log_scale import step_trainable


def closed_form(lr0: float, t: int, total: int) -> float:
    """lr_t = lr0 * (1 + cos(pi * t / T)) / 2 (Loshchilov & Hutter 2017, one cycle)."""
    return lr0 * (1 + math.cos(math.pi * min(t, total) / total)) / 2


def test_trial_schedule_is_the_half_cosine_to_zero():
    schedule = trial_schedule(0.2, "cosine", 120)
    oracle = optax.cosine_decay_schedule(0.2, 120)
    for t in (0, 1, 30, 60, 119, 120, 200):
        assert schedule(t) == pytest.approx(closed_form(0.2, t, 120), rel=1e-12, abs=1e-15)
        assert schedule(t) == pytest.approx(float(oracle(t)), rel=1e-5, abs=1e-7)
    assert schedule(120) == 0.0
    assert trial_schedule(0.2, "constant", 120)(77) == 0.2


def test_baseline_trial_decays_over_its_whole_budget(tiny):
    exp = tiny("pbt.scheduler=random", "pbt.lr_schedule=cosine", "pbt.iterations=3").section.model_dump(mode="json")
    total = 3 * exp["steps_per_iteration"]
    trainable, results = step_trainable({"lr": 0.1, "exp": exp}, iterations=3)
    expected = [closed_form(0.1, t, total) for t in range(total)]
    np.testing.assert_allclose(trainable.task.lrs, expected, rtol=1e-12, atol=1e-15)
    assert [r["lr"] for r in results] == [0.1] * 3  # the trial's (peak) lr identifies it
    assert results[-1]["last_lr"] == pytest.approx(closed_form(0.1, total - 1, total))
    # its replay plays the same decay, not a constant
    replayed = replay_schedule([(0, 0.1)], "cosine", total)
    assert [replayed(t) for t in range(total)] == trainable.task.lrs
    # the default stays constant
    constant = tiny("pbt.scheduler=grid").section.model_dump(mode="json")
    trainable, _ = step_trainable({"lr": 0.1, "exp": constant}, iterations=1)
    assert trainable.task.lrs == [0.1] * constant["steps_per_iteration"]


@pytest.mark.parametrize("scheduler", ["pbt", "pb2"])
def test_pbt_and_pb2_refuse_a_cosine_schedule(tiny, scheduler):
    with pytest.raises(ConfigError, match="lr_schedule") as err:
        tiny(f"pbt.scheduler={scheduler}", "pbt.lr_schedule=cosine")
    assert "\n" not in str(err.value) and "random | grid" in str(err.value)


def test_cosine_baseline_summary_draws_and_reports_the_decay_not_the_peak(tiny, tmp_path, monkeypatch):
    """A cosine baseline's summary row: final lr = the lr of its last step (not the peak), and its recorded and
    plotted schedule follows the decay, one segment per iteration, whose first lr is the peak replay reads."""
    section = tiny("pbt.scheduler=random", "pbt.lr_schedule=cosine", "pbt.iterations=4").section
    spi = section.steps_per_iteration
    total = 4 * spi
    trainable, results = step_trainable({"lr": 0.1, "exp": section.model_dump(mode="json")}, iterations=4)
    trial = tmp_path / "trial"
    trial.mkdir()
    with open(trial / "progress.csv", "w") as out:
        out.write("lr,step,val_accuracy\n" + "".join(f"{r['lr']},{r['step']},{r['val_accuracy']}\n" for r in results))
    # the lineage its checkpoints carried (read from the checkpoint in a sweep): the peak from step 0
    monkeypatch.setattr(sweep, "carried_history", lambda result, trial_id: list(trainable.lr_history))
    metrics = {**results[-1], "trial_id": "t0", "experiment_tag": "0_lr=0.1", "training_iteration": 4}
    result = SimpleNamespace(path=str(trial), metrics=metrics, checkpoint=None)
    (row,) = summarise_trials([result], section, "val_accuracy", "max", tmp_path)

    assert row.final_lr == pytest.approx(closed_form(0.1, total - 1, total), rel=1e-12)
    assert row.final_lr == pytest.approx(trainable.task.lrs[-1], rel=1e-12)  # the lr it really trained with last
    want = [(i * spi, closed_form(0.1, i * spi, total)) for i in range(4)]
    assert [s for s, _ in row.schedule] == [s for s, _ in want]
    np.testing.assert_allclose([lr for _, lr in row.schedule], [lr for _, lr in want], rtol=1e-12)
    assert [lr for _, lr in row.schedule] == trainable.task.lrs[::spi]  # each iteration's first step
    assert row.schedule[0][1] == 0.1 and row.lineage_agrees is True  # the peak, and the carried lineage agrees
    xs, ys = plots.step_curve(row.schedule, total)  # what schedules.png draws: a decaying staircase
    assert xs[-1] == total and ys == sorted(ys, reverse=True) and len(set(ys)) == 4
    replayed = replay_schedule(row.schedule, "cosine", total)  # metaopt replay still plays the exact decay
    assert [replayed(t) for t in range(total)] == trainable.task.lrs
    table = format_table(SweepSummary("x", "r", "u", "val_accuracy", "max", "t0", [row], str(tmp_path), 0.0))
    assert f"{spi}:{closed_form(0.1, spi, total):.3g}" in table
    # a constant baseline keeps its one segment and its lr
    constant = tiny("pbt.scheduler=random", "pbt.iterations=4").section
    metrics = {k: v for k, v in metrics.items() if k != "last_lr"}
    monkeypatch.setattr(sweep, "carried_history", lambda result, trial_id: None)
    result = SimpleNamespace(path=str(trial), metrics=metrics, checkpoint=None)
    (row,) = summarise_trials([result], constant, "val_accuracy", "max", tmp_path)
    assert (row.schedule, row.final_lr) == ([(0, 0.1)], 0.1)
