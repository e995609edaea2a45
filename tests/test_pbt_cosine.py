"""The fixed-lr baselines' ``lr_schedule: cosine``: the tuned cosine schedule PBT is compared with (issue 23, R1)."""

from __future__ import annotations

import math

import numpy as np
import optax
import pytest

from metaopt.errors import ConfigError
from metaopt.pbt.lineage import trial_schedule
from metaopt.pbt.replay import replay_schedule
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
