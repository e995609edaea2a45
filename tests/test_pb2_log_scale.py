"""PB2 searches log10(lr): Tune's PB2 gets log bounds, every consumer sees the real lr (Parker-Holder et al. 2020
normalise each bound linearly; on [1e-4, 1] that would put nine proposals in ten above 0.1)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

from ray.tune.search.variant_generator import generate_variants

from metaopt.pbt import lineage
from metaopt.pbt.tune import LRTrainable, build_scheduler, lr_space, sync_lr


class RecordingTask:
    """A task that records the lr of every optimizer step it is asked to take."""

    metric, mode, divergence_loss = "val_accuracy", "max", None

    def __init__(self) -> None:
        self.step, self.lrs = 0, []

    def train(self, num_steps, lr_at):
        for _ in range(num_steps):
            self.lrs.append(lr_at(self.step))
            self.step += 1
        return {"val_accuracy": 0.5, "loss": 1.0}


def step_trainable(config, iterations):
    """LRTrainable.step, the real code, on a recording task (no Ray actor)."""
    trainable = SimpleNamespace(config=config, section=config["exp"], task=RecordingTask(), lr_history=[])
    results = [LRTrainable.step(trainable) for _ in range(iterations)]
    return trainable, results


def test_tune_pb2_gets_log_bounds_and_explores_in_log_space(tiny):
    from ray.tune.schedulers.pb2 import PB2

    section = tiny("pbt.scheduler=pb2").section  # lr in [1e-3, 0.3]
    scheduler = build_scheduler(section, "val_accuracy", "max")
    assert isinstance(scheduler, PB2)
    # Tune's PB2 is the oracle: the box it normalises is [log10 lr_min, log10 lr_max], nothing on the raw lr
    assert scheduler._hyperparam_bounds == {"log_lr": [math.log10(1e-3), math.log10(0.3)]}
    assert scheduler._hyperparam_bounds_flat == {"log_lr": [-3.0, math.log10(0.3)]}
    # its explore hook keeps lr equal to 10 ** log_lr, never the clone's stale lr
    exp = section.model_dump(mode="json")
    assert sync_lr({"log_lr": -2.0, "lr": 0.25, "exp": exp})["lr"] == 10**-2.0


def test_pb2_initial_configs_hold_log_lr_and_the_real_lr(tiny):
    section = tiny("pbt.scheduler=pb2", "pbt.population=16").section
    space = {"config": {**lr_space(section), "exp": section.model_dump(mode="json")}}
    configs = [spec["config"] for _ in range(16) for _vars, spec in generate_variants(space)]
    for config in configs:
        assert -3.0 <= config["log_lr"] <= math.log10(0.3)
        assert config["lr"] == lineage.config_lr(config) == min(10 ** config["log_lr"], 0.3)
    # log-uniform, so about half the rates lie below the geometric middle (1.7e-2); linear bounds gave ~6%
    assert sum(c["lr"] < math.sqrt(1e-3 * 0.3) for c in configs) >= 4


def test_config_lr_exponentiates_and_stays_in_range():
    exp = {"lr_min": 1e-3, "lr_max": 0.3}
    assert lineage.config_lr({"lr": 0.05}) == 0.05  # PBT and the baselines: lr as is
    assert lineage.config_lr({"log_lr": -2.0, "lr": 0.7}) == 10**-2.0  # log_lr wins over a stale lr
    exp = {"lr_min": 3e-4, "lr_max": 0.2}
    assert 10 ** math.log10(0.2) > 0.2 and 10 ** math.log10(3e-4) > 3e-4  # the rounding the clip absorbs
    assert lineage.config_lr({"log_lr": math.log10(0.2), "exp": exp}) == 0.2
    assert lineage.config_lr({"log_lr": math.log10(3e-4), "exp": exp}) == 10 ** math.log10(3e-4)  # inside: as is


def test_trainable_trains_at_ten_to_the_log_lr(tiny):
    exp = tiny("pbt.scheduler=pb2").section.model_dump(mode="json")
    config = {"log_lr": -1.5, "lr": 0.2, "exp": exp}  # lr deliberately stale: the trainable must not use it
    trainable, results = step_trainable(config, iterations=2)
    assert trainable.task.lrs == [10**-1.5] * (2 * exp["steps_per_iteration"])
    assert [r["lr"] for r in results] == [10**-1.5, 10**-1.5]  # the reported metric is the real lr
    assert trainable.lr_history == [(0, 10**-1.5)]


def test_pb2_policy_log_with_log_lr_gives_the_schedule_in_real_lr(tmp_path):
    # A crafted pbt_global.txt as Tune's PB2 writes it: configs hold log_lr (and a possibly stale lr).
    exp = {"lr_min": 1e-3, "lr_max": 0.3, "steps_per_iteration": 10}

    def config(log_lr, stale_lr):
        return {"log_lr": log_lr, "lr": stale_lr, "exp": exp}

    lines = [
        ["B", "A", 4, 4, config(-1.0, 0.1), config(-1.3, 0.1)],  # B copies A at iteration 4, log_lr -1.3
        ["A", "B", 8, 8, config(-1.3, 0.05), config(math.log10(0.3), 0.05)],  # A copies B, proposes the top bound
    ]
    path = tmp_path / "pbt_global.txt"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    events = lineage.read_pbt_global(path)
    a0, b0, b1, top = 0.1, 10**-2.0, 10**-1.3, lineage.config_lr(config(math.log10(0.3), 0.05))
    assert math.isclose(top, 0.3) and top <= 0.3
    # what the trials reported (step after the iteration, real lr), as the trainable does
    reported = {
        "A": [(10 * i, a0) for i in range(1, 9)] + [(10 * i, top) for i in range(9, 13)],
        "B": [(10 * i, b0) for i in range(1, 5)] + [(10 * i, b1) for i in range(5, 13)],
    }
    resolved = lineage.resume_steps(events, reported, 10, boundary_steps=40)
    assert [e.resumed_step for e in resolved] == [40, 80]
    schedules = lineage.replay_events({"A": a0, "B": b0}, resolved)
    assert schedules["B"] == [(0, a0), (40, b1)]
    assert schedules["A"] == [(0, a0), (40, b1), (80, top)]
