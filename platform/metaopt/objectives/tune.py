"""The only place in ``metaopt.objectives`` that knows Ray Tune: one trial = one ES meta-training run.

One Tune iteration is one ES generation. A checkpoint holds the whole ES state (evosax's pytree, serialised with
flax msgpack), the generation, the cached PPO baselines and the current ES mean exported as a drift artifact
(``drift/``, see :mod:`metaopt.objectives.export`). Because each generation's randomness comes from the
generation number, a trial restored from a checkpoint continues bit-identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune

from metaopt.cache import replace_atomically
from metaopt.objectives.config import LPOSection
from metaopt.objectives.meta_train import MetaTrainer
from metaopt.runtime import with_worker_bundles
from metaopt.trainable import Trainable
from metaopt.tuning import SweepSettings, grid_tuner, read_checkpoint_file

STATE_FILE = "es_state.msgpack"
META_FILE = "meta.json"
DRIFT_DIR = "drift"


class MetaTrainable(Trainable):
    """``config['exp']``: the resolved ``lpo`` section; ``config['meta_seed']``: this run's seed."""

    def start(self, config: dict[str, Any]) -> None:
        self.section = LPOSection.model_validate(config["exp"])
        evaluator = None
        if self.section.workers:
            from metaopt.objectives.population import RayPopulation

            evaluator = RayPopulation(self.section.workers, self.section.cpus_per_worker, self.section.gpus_per_worker)
        self.trainer = MetaTrainer(self.section, int(config["meta_seed"]), evaluator)
        self.state = self.trainer.init_state()
        self.start_score: float | None = None  # the ES mean at generation 0 (PPO's objective), same eval seeds

    def step(self) -> dict[str, Any]:
        generation = self.iteration  # generations finished so far
        if self.start_score is None:
            self.start_score = self.trainer.evaluate_mean(self.state, 0)["mean_score"]
        self.state, result = self.trainer.generation(self.state, generation)
        metrics = self.trainer.generation_metrics(self.state, result)
        done = generation + 1
        # Every key in every result (NaN when not evaluated): Tune's progress.csv keeps the first row's columns.
        metrics.update(self.trainer.eval_template())
        if done % self.section.eval_every == 0 or done == self.section.es.generations:
            metrics.update(self.trainer.evaluate_mean(self.state, done))
        metrics["generation"] = done
        metrics["start_mean_score"] = self.start_score
        metrics["compile_seconds"] = getattr(self.trainer.evaluator, "compile_seconds", 0.0)
        return metrics

    def write_checkpoint(self, directory: Path) -> None:
        from flax import serialization

        from metaopt.objectives.export import save_drift

        state = serialization.to_bytes(self.state)
        replace_atomically(directory / STATE_FILE, lambda tmp: tmp.write_bytes(state))
        meta = {
            "generation": self.iteration,
            "baselines": self.trainer.baselines,
            "meta_seed": self.config["meta_seed"],
            "start_mean_score": self.start_score,
        }
        replace_atomically(directory / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        save_drift(
            directory / DRIFT_DIR,
            self.section.drift,
            self.trainer.mean_params(self.state),
            dict(self.trainer.drift_options),
        )

    def read_checkpoint(self, directory: Path) -> int:
        from flax import serialization

        template = self.trainer.init_state()
        self.state = read_checkpoint_file(
            directory / STATE_FILE, lambda path: serialization.from_bytes(template, path.read_bytes())
        )
        meta = read_checkpoint_file(directory / META_FILE, lambda path: json.loads(path.read_text()))
        self.trainer.baselines = {k: float(v) for k, v in meta["baselines"].items()}
        self.start_score = meta.get("start_mean_score")
        return int(meta["generation"])

    def cleanup(self) -> None:
        close = getattr(self.trainer.evaluator, "close", None)
        if close:
            close()


def trial_resources(section: LPOSection, per_trial: dict[str, float]):
    """The trial's own slot, plus one bundle per population worker (so a cluster places them together)."""
    return with_worker_bundles(per_trial, section.workers, section.cpus_per_worker, section.gpus_per_worker)


def build_tuner(section: LPOSection, sweep: SweepSettings) -> tune.Tuner:
    """One trial per meta-seed; stop after ``es.generations``; checkpoints every ``checkpoint_every``, the last
    ``sweep.checkpoints_to_keep`` kept."""
    param_space = {"exp": section.model_dump(mode="json"), "meta_seed": tune.grid_search(list(section.meta_seeds))}
    return grid_tuner(
        MetaTrainable,
        trial_resources(section, sweep.resources),
        param_space,
        iterations=section.es.generations,
        scheduler=None,
        max_failures=section.max_failures,
        sweep=sweep,
        checkpoint_every=section.checkpoint_every,
    )
