"""The only place in ``metaopt.pbt`` that knows Ray Tune: the trainable and the Tuner it runs in.

``LRTrainable`` is a *class* trainable because PBT's costs are per iteration and per checkpoint
(see PAPERS.md, "Population-based training"): one Tune iteration runs ``steps_per_iteration`` optimizer
steps, checkpoints happen only at perturbation boundaries (plus when PBT asks a top trial to save), and
``reset_config`` lets Tune reuse the actor when a trial exploits another instead of starting a new process.

After a restore the trainable re-reads ``self.config`` for the learning rate: the checkpoint carries the
*clone's* weights and optimizer state, but the perturbed lr is the one in the new config.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from ray import tune

from metaopt.even_finish import EvenFinishPBT
from metaopt.pbt.config import PBTSection
from metaopt.pbt.lineage import LOG_LR_KEY, config_lr, record_lr, trial_schedule
from metaopt.tasks import build_task
from metaopt.trainable import Trainable
from metaopt.tuning import (
    SeededPBT,
    SweepSettings,
    actor_keeping_search,
    checkpoint_config,
    run_config,
    seeded_random_search,
)

STATE_FILE = "trainable_state.pt"


class LRTrainable(Trainable):
    """Trains a :mod:`metaopt.tasks` task at the learning rate the outer loop controls: ``config['lr']``, or
    ``10 ** config['log_lr']`` where PB2 searches log10(lr) (:func:`metaopt.pbt.lineage.config_lr`).

    ``config['exp']`` is the resolved ``pbt`` section (a dict), logged whole as MLflow params.
    Reports the task's metrics plus ``lr`` (the config's real lr; under ``lr_schedule: cosine`` the peak, with
    ``last_lr`` the lr of the iteration's last step), ``step`` and ``diverged`` each iteration.
    """

    uses_torch = True
    state_file = STATE_FILE

    def start(self, config: dict[str, Any]) -> None:
        """Fresh task and history; a checkpoint, if the trial has one, is loaded afterwards by Tune."""
        section = config["exp"]
        self.section = section
        self.task = build_task(section["task"], section["task_options"], section["optimizer"], section["seed"])
        self.lr_history = record_lr([], 0, config_lr(config))
        self.diverged = False

    def step(self) -> dict[str, Any]:
        lr = config_lr(self.config)
        self.lr_history = record_lr(self.lr_history, self.task.step, lr)
        section = self.section
        budget = section["iterations"] * section["steps_per_iteration"]
        lr_at = trial_schedule(lr, section.get("lr_schedule", "constant"), budget)
        metrics = self.task.train(section["steps_per_iteration"], lr_at)
        self.diverged = has_diverged(metrics.get("loss", 0.0), getattr(self.task, "divergence_loss", None))
        result = {**metrics, "lr": lr, "step": self.task.step, "diverged": int(self.diverged)}
        if section.get("lr_schedule", "constant") != "constant":
            result["last_lr"] = float(lr_at(self.task.step - 1))
        if self.diverged:
            # Worst possible score: PBT exploits this trial at its next boundary; fixed-LR baselines stop it.
            result[self.task.metric] = -math.inf if self.task.mode == "max" else math.inf
            if self.section["scheduler"] not in ("pbt", "pb2"):
                result["done"] = True
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task.state(), "lr_history": self.lr_history, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        self.task.restore(state["task"])
        # The checkpoint is the clone's lineage; from here on this trial's config decides the lr.
        self.lr_history = record_lr(state["lr_history"], self.task.step, config_lr(self.config))
        return int(state["iteration"])  # the iteration that matches the weights and the step count

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        # Tune reuses this actor for *another* trial (possibly a brand-new one): start from scratch. If that
        # trial has a checkpoint, Tune calls load_checkpoint next and the lineage history comes from there.
        self.cleanup()
        self.config = new_config
        self.start(new_config)
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


def lr_space(section: PBTSection) -> dict[str, Any]:
    """The trial configs' lr keys: ``lr`` from :func:`initial_lrs`; for pb2, the ``log_lr`` it searches, uniform
    on the log10 bounds (the same log-uniform lr), and ``lr`` derived from it, so params show the real lr."""
    if section.scheduler == "pb2":
        low, high = log_lr_bounds(section)
        return {LOG_LR_KEY: tune.uniform(low, high), "lr": tune.sample_from(lr_of_spec)}
    return {"lr": initial_lrs(section)}


def log_lr_bounds(section: PBTSection) -> list[float]:
    """PB2's box for ``log_lr``: ``[log10 lr_min, log10 lr_max]``."""
    return [math.log10(section.lr_min), math.log10(section.lr_max)]


def lr_of_spec(spec: Any) -> float:
    """``lr`` of a PB2 trial's first config, from the ``log_lr`` Tune drew for it (a ``tune.sample_from``)."""
    return config_lr({LOG_LR_KEY: spec.config[LOG_LR_KEY], "exp": spec.config["exp"]})


def sync_lr(config: dict[str, Any]) -> dict[str, Any]:
    """PB2's explore step with ``lr`` set from the ``log_lr`` it chose, so the config (and Tune's policy log)
    never carries the clone's stale lr."""
    config["lr"] = config_lr(config)
    return config


def clip_lr(config: dict[str, Any], *, low: float, high: float) -> dict[str, Any]:
    """PBT's explore step with ``lr`` clipped to the searched range ``[low, high]``."""
    config["lr"] = min(max(float(config["lr"]), low), high)
    return config


def build_scheduler(section: PBTSection, metric: str, mode: str):
    """PBT / PB2 over ``lr`` with the section's interval, quantile and mutation settings; None for baselines.

    Asynchronous PBT/PB2 levels the population at the end (:class:`metaopt.even_finish.EvenFinish`) unless
    ``even_finish`` is off.
    """
    shared = {
        "time_attr": "training_iteration",
        "metric": metric,
        "mode": mode,
        "perturbation_interval": section.perturbation_interval,
        "quantile_fraction": section.quantile_fraction,
        "synch": section.synch,
    }
    # Synchronous PBT already waits for every trial at each boundary: Tune's own scheduler, its draws seeded.
    levelled = {"stop_iteration": section.iterations} if section.even_finish and not section.synch else {}
    if section.scheduler == "pbt":
        return (EvenFinishPBT if levelled else SeededPBT)(
            hyperparam_mutations={"lr": tune.loguniform(section.lr_min, section.lr_max)},
            resample_probability=section.resample_probability,
            perturbation_factors=tuple(section.perturbation_factors),
            # Tune multiplies lr by a factor with no bounds: keep every explored lr inside [lr_min, lr_max].
            custom_explore_fn=functools.partial(clip_lr, low=section.lr_min, high=section.lr_max),
            seed=section.seed,
            **shared,
            **levelled,
        )
    if section.scheduler == "pb2":
        # PB2 (Parker-Holder et al. 2020) explores with a GP bandit inside the bounds instead of random factors.
        # Both modules import GPy/sklearn: only when asked for.
        from ray.tune.schedulers.pb2 import PB2

        from metaopt.even_finish_pb2 import EvenFinishPB2

        scheduler_cls = EvenFinishPB2 if levelled else PB2
        # The GP normalises each bound linearly: search log10(lr), so proposals spread over the decades.
        return scheduler_cls(
            hyperparam_bounds={LOG_LR_KEY: log_lr_bounds(section)}, custom_explore_fn=sync_lr, **shared, **levelled
        )
    return None


def build_tuner(section: PBTSection, sweep: SweepSettings, metric: str, mode: str) -> tune.Tuner:
    """A Tuner whose trials are LRTrainable over the section's lr space; the whole section rides in config.
    Each trial keeps its last ``sweep.checkpoints_to_keep`` checkpoints (and any PBT may still restore)."""
    scheduler = build_scheduler(section, metric, mode)
    grid = section.scheduler == "grid"
    callbacks = list(sweep.callbacks)
    if scheduler is not None:
        search, callbacks = actor_keeping_search(section.seed, callbacks)
    else:
        search = None if grid else seeded_random_search(section.seed)
    checkpoints, callbacks = checkpoint_config(
        section.checkpoint_every, sweep.checkpoints_to_keep, scheduler, callbacks
    )
    trainable = tune.with_resources(LRTrainable, sweep.resources)
    return tune.Tuner(
        trainable,
        param_space={
            **lr_space(section),
            "exp": section.model_dump(mode="json"),
            "verbose_actors": sweep.verbose >= 1,
        },
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            num_samples=1 if grid else section.population,
            reuse_actors=True,
            max_concurrent_trials=sweep.max_concurrent_trials,
            search_alg=search,
        ),
        # Tune's own clock, which synchronous PBT waits on; load_checkpoint keeps it equal to steps / iteration.
        run_config=run_config(
            sweep,
            iterations=section.iterations,
            checkpoints=checkpoints,
            max_failures=section.max_failures,
            callbacks=callbacks,
        ),
    )
