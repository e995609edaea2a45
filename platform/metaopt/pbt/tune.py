"""The only place in ``metaopt.pbt`` that knows Ray Tune: the trainable and the Tuner it runs in.

``LRTrainable`` is a *class* trainable because PBT's costs are per iteration and per checkpoint
(see PAPERS.md, "Population-based training"): one Tune iteration runs ``steps_per_iteration`` optimizer
steps, checkpoints happen only at perturbation boundaries (plus when PBT asks a top trial to save), and
``reset_config`` lets Tune reuse the actor when a trial exploits another instead of starting a new process.

After a restore the trainable re-reads ``self.config`` for the learning rate: the checkpoint carries the
*clone's* weights and optimizer state, but the perturbed lr is the one in the new config.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining

from metaopt.pbt.config import PBTSection
from metaopt.pbt.lineage import record_lr
from metaopt.tasks import build_task
from metaopt.tuning import actor_keeping_search, seeded_random_search

STATE_FILE = "trainable_state.pt"


class LRTrainable(tune.Trainable):
    """Trains a :mod:`metaopt.tasks` task; ``config['lr']`` is the learning rate the outer loop controls.

    ``config['exp']`` is the resolved ``pbt`` section (a dict), logged whole as MLflow params.
    Reports the task's metrics plus ``lr``, ``step`` and ``diverged`` each iteration.
    """

    def setup(self, config: dict[str, Any]) -> None:
        # One torch thread per trial: trials already run in parallel, oversubscription only slows them.
        torch.set_num_threads(max(1, int(os.environ.get("METAOPT_TORCH_THREADS", "1"))))
        if not config.get("verbose_actors"):
            # Per-checkpoint INFO lines from every actor drown the progress table on the driver.
            for name in ("ray.tune.trainable.trainable", "ray.train._internal.storage"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self._start(config)

    def _start(self, config: dict[str, Any]) -> None:
        """Fresh task and history; a checkpoint, if the trial has one, is loaded afterwards by Tune."""
        section = config["exp"]
        self.section = section
        self.task = build_task(section["task"], section["task_options"], section["optimizer"], section["seed"])
        self.lr_history = record_lr([], 0, float(config["lr"]))
        self.diverged = False

    def step(self) -> dict[str, Any]:
        lr = float(self.config["lr"])
        self.lr_history = record_lr(self.lr_history, self.task.step, lr)
        metrics = self.task.train(self.section["steps_per_iteration"], lambda _step: lr)
        self.diverged = has_diverged(metrics.get("loss", 0.0), getattr(self.task, "divergence_loss", None))
        result = {**metrics, "lr": lr, "step": self.task.step, "diverged": int(self.diverged)}
        if self.diverged:
            # Worst possible score: PBT exploits this trial at its next boundary; fixed-LR baselines stop it.
            result[self.task.metric] = -math.inf if self.task.mode == "max" else math.inf
            if self.section["scheduler"] not in ("pbt", "pb2"):
                result["done"] = True
        return result

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        torch.save(
            {"task": self.task.state(), "lr_history": self.lr_history, "iteration": self.iteration},
            Path(checkpoint_dir) / STATE_FILE,
        )
        return checkpoint_dir

    def load_checkpoint(self, checkpoint: str | dict | None) -> None:
        path = Path(checkpoint if isinstance(checkpoint, str) else checkpoint["checkpoint_dir"]) / STATE_FILE
        state = torch.load(path, weights_only=False, map_location="cpu")
        self.task.restore(state["task"])
        # Tune set our iteration from the result it *associated* with this checkpoint, which can be stale
        # (Ray 2.60 may hand an exploiting trial a later checkpoint of a still-running clone). The iteration
        # saved inside the checkpoint is the one that matches the weights and the step count.
        self._iteration = int(state["iteration"])
        # The checkpoint is the clone's lineage; from here on this trial's config decides the lr.
        self.lr_history = record_lr(state["lr_history"], self.task.step, float(self.config["lr"]))

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        # Tune reuses this actor for *another* trial (possibly a brand-new one): start from scratch. If that
        # trial has a checkpoint, Tune calls load_checkpoint next and the lineage history comes from there.
        self.cleanup()
        self.config = new_config
        self._start(new_config)
        return True

    def cleanup(self) -> None:
        close = getattr(self.task, "close", None)
        if close:
            close()


def has_diverged(loss: float, divergence_loss: float | None) -> bool:
    """NaN/inf loss, or a finite loss beyond the task's divergence threshold."""
    return not math.isfinite(loss) or (divergence_loss is not None and loss > divergence_loss)


def initial_lrs(section: PBTSection) -> Any:
    """The lr search space: log-uniform for pbt/pb2/random, log-spaced points for grid."""
    if section.scheduler == "grid":
        return tune.grid_search([float(v) for v in np.geomspace(section.lr_min, section.lr_max, section.population)])
    return tune.loguniform(section.lr_min, section.lr_max)


def build_scheduler(section: PBTSection, metric: str, mode: str):
    """PBT / PB2 over ``lr`` with the section's interval, quantile and mutation settings; None for baselines."""
    shared = dict(
        time_attr="training_iteration",
        metric=metric,
        mode=mode,
        perturbation_interval=section.perturbation_interval,
        quantile_fraction=section.quantile_fraction,
        synch=section.synch,
    )
    if section.scheduler == "pbt":
        return PopulationBasedTraining(
            hyperparam_mutations={"lr": tune.loguniform(section.lr_min, section.lr_max)},
            resample_probability=section.resample_probability,
            perturbation_factors=tuple(section.perturbation_factors),
            **shared,
        )
    if section.scheduler == "pb2":
        # PB2 (Parker-Holder et al. 2020) explores with a GP bandit inside the bounds instead of random factors.
        from ray.tune.schedulers.pb2 import PB2  # imports GPy/sklearn: only when asked for

        return PB2(hyperparam_bounds={"lr": [section.lr_min, section.lr_max]}, **shared)
    return None


def build_tuner(
    section: PBTSection,
    *,
    experiment_name: str,
    storage_path: str,
    metric: str,
    mode: str,
    resources: dict[str, float],
    max_concurrent_trials: int | None,
    callbacks: list[Any],
    verbose: int = 0,
) -> tune.Tuner:
    """A Tuner whose trials are LRTrainable over the section's lr space; the whole section rides in config."""
    scheduler = build_scheduler(section, metric, mode)
    grid = section.scheduler == "grid"
    if scheduler is not None:
        search, callbacks = actor_keeping_search(section.seed, callbacks)
    else:
        search = None if grid else seeded_random_search(section.seed)
    trainable = tune.with_resources(LRTrainable, resources)
    return tune.Tuner(
        trainable,
        param_space={"lr": initial_lrs(section), "exp": section.model_dump(mode="json"), "verbose_actors": verbose >= 1},
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            num_samples=1 if grid else section.population,
            reuse_actors=True,
            max_concurrent_trials=max_concurrent_trials,
            search_alg=search,
        ),
        run_config=tune.RunConfig(
            name=experiment_name,
            storage_path=storage_path,
            # Tune's own clock, which synchronous PBT waits on; load_checkpoint keeps it equal to steps / iteration.
            stop={"training_iteration": section.iterations},
            checkpoint_config=tune.CheckpointConfig(
                checkpoint_frequency=section.checkpoint_every,
                checkpoint_at_end=True,
                num_to_keep=None,
            ),
            failure_config=tune.FailureConfig(max_failures=section.max_failures),
            callbacks=callbacks,
            verbose=verbose,
        ),
    )
