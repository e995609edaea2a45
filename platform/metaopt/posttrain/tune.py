"""The only place in ``metaopt.posttrain`` that knows Ray Tune: one trial = one post-training run of one
curriculum x seed; one iteration = ``steps_per_iteration`` GRPO steps, then (every ``eval_every`` iterations)
the greedy accuracy per category. A checkpoint every iteration holds the learner (model, optimizer, step),
the curriculum, the RNG and the reference weights, so a crashed trial resumes where it was, and PBT can
clone a trial and change its learning rate (``lr`` in the trial config) without losing the optimizer's moments.
"""

from __future__ import annotations

import math
from typing import Any

from ray import tune

from metaopt.posttrain.config import PostTrainSection
from metaopt.trainable import Trainable
from metaopt.tuning import SweepSettings, grid_tuner, lr_pbt


class PostTrainTrainable(Trainable):
    """``config``: ``exp`` (the resolved section), ``curriculum``, ``seed`` and optionally ``lr`` (PBT).

    A restored trial counts its iterations as Tune restored them (its checkpoint holds GRPO steps, not iterations).
    """

    uses_torch = True

    def start(self, config: dict[str, Any]) -> None:
        from metaopt.posttrain.loop import GRPORun
        from metaopt.posttrain.roles import start_roles

        self.section = PostTrainSection.model_validate(config["exp"])
        self.roles = start_roles(self.section, int(config["seed"]))
        self.run = GRPORun(self.section, config["curriculum"], int(config["seed"]), self.roles, lr=config.get("lr"))

    def step(self) -> dict[str, Any]:
        section = self.section
        warmup = {} if self.run.warmed_up else self.run.warm_up()
        if warmup and self.iteration == 0:
            warmup.update({f"warmup_{k}": v for k, v in self.run.evaluate().items()})
        metrics: list[dict[str, Any]] = []
        for _ in range(min(section.steps_per_iteration, section.steps - self.run.steps_done)):
            metrics.append(self.run.step())
        result = average(metrics)
        result.update(warmup)
        iteration = self.iteration + 1
        if iteration % section.eval_every == 0 or self.run.steps_done >= section.steps:
            result.update(self.run.evaluate())
        if section.samples_to_log:
            result["samples_text"] = self.run.sample_text(section.samples_to_log)
        result["lr_config"] = float(self.config.get("lr") or math.nan)
        result["done"] = self.run.steps_done >= section.steps
        return result

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from metaopt.posttrain.loop import schedule_spec

        self.run.load_state_dict(state)
        # After a PBT exploit the clone's state arrives with this trial's perturbed lr in config.
        if self.config.get("lr") is not None:
            self.run.lr = float(self.config["lr"])
            self.roles.get(
                self.roles.call(self.roles.learner, "set_schedule", schedule_spec(self.section, self.run.lr))
            )

    def cleanup(self) -> None:
        self.run.taskset.close()
        self.roles.close()


def average(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each numeric metric over the iteration's GRPO steps; the last value of counters."""
    if not rows:
        return {}
    keys = {k for row in rows for k in row}
    out: dict[str, Any] = {}
    for key in sorted(keys):
        values = [row[key] for row in rows if key in row and isinstance(row[key], (int, float))]
        if values:
            out[key] = values[-1] if key in ("grpo_step", "lr", "reward_failures") else float(sum(values) / len(values))
    return out


def build_tuner(section: PostTrainSection, sweep: SweepSettings) -> tune.Tuner:
    """Curricula x seeds as a grid (or a PBT population over the learner's lr); a checkpoint every iteration,
    the last ``sweep.checkpoints_to_keep`` kept."""
    from metaopt.posttrain.roles import role_bundles

    bundles = role_bundles(section, sweep.resources)
    trial_resources = tune.PlacementGroupFactory(bundles) if len(bundles) > 1 else sweep.resources
    param_space: dict[str, Any] = {
        "exp": section.model_dump(mode="json"),
        "curriculum": tune.grid_search(list(section.curricula)),
        "seed": tune.grid_search(list(section.seeds)),
    }
    scheduler = None
    if section.scheduler == "pbt":
        lr = float(section.optimizer.lr)
        param_space["lr"] = lr
        scheduler = lr_pbt("accuracy", section.pbt_interval, lr / 10, lr * 10, seed=section.seeds[0])
    return grid_tuner(
        PostTrainTrainable,
        trial_resources,
        param_space,
        iterations=section.iterations,
        scheduler=scheduler,
        max_failures=section.max_failures,
        sweep=sweep,
    )
