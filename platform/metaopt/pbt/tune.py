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
from typing import Any

import numpy as np
import torch
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from metaopt.pbt.config import PBTSection
from metaopt.pbt.lineage import record_lr
from metaopt.tasks import build_task
from metaopt.tuning import (
    SeededPBT,
    actor_keeping_search,
    checkpoint_config,
    load_state,
    save_state,
    seeded_random_search,
)

STATE_FILE = "trainable_state.pt"
# Handing a reused actor from one trial to another (save, pause, reset_config, restore) took 35-75 ms per
# worker process on the 2-core development machine (benchmarks/README.md, pbt_overhead.py); the upper end.
TRIAL_SWITCH_SECONDS = 0.075


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
        state = {"task": self.task.state(), "lr_history": self.lr_history, "iteration": self.iteration}
        return save_state(state, checkpoint_dir, STATE_FILE)

    def load_checkpoint(self, checkpoint: str | dict | None) -> None:
        state = load_state(checkpoint, STATE_FILE)
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


def yields_in_last_stretch(left: int, to_next_boundary: int, waiting_left: list[int], yielding: int = 0) -> bool:
    """Should a running trial with ``left`` iterations to go hand its worker to a waiting one?

    Only in its last stretch (its next perturbation boundary, ``to_next_boundary`` iterations away, is at or past
    its end: no exploit/explore ahead, so the order in which the population trains no longer matters to PBT), and
    only to a trial with more iterations left: longest-remaining-first, which keeps the population within one
    iteration of each other at the end. ``yielding`` trials have already been told to hand over their worker
    and have not yet: each waiting trial needs only one.
    """
    return left <= to_next_boundary and sum(other > left for other in waiting_left) > yielding


def levelling_pays(iteration_seconds: float, population: int, running: int, switch_seconds: float) -> bool:
    """Is an iteration long enough for the extra trial switches of levelling to cost less than they save?

    Without levelling, trials take turns of ``interval`` iterations, so the last trial trains alone for up to a
    turn (on average about half of one, (interval - 1) / 2 iterations). Levelling adds at most
    ``population x (interval - 1)`` switches, spread over the ``running`` workers. Worth it when
    (interval - 1) / 2 x iteration_seconds >= population x (interval - 1) x switch_seconds / running.
    """
    return iteration_seconds * running >= 2 * population * switch_seconds


def waiting_trials(trials: list[Trial]) -> list[Trial]:
    """Trials that could take a free worker: not started yet, or paused."""
    return [t for t in trials if t.status in (Trial.PENDING, Trial.PAUSED)]


class EvenFinish:
    """Asynchronous PBT/PB2 whose population finishes together (a mixin in front of the Tune scheduler).

    Tune's asynchronous PBT pauses a trial only at a perturbation boundary when another trial waits, and resumes
    the waiting trial with the least training. With more trials than workers the trials take turns of
    ``perturbation_interval`` iterations, so at the end of a sweep one worker trains the last trial alone for up
    to a turn while the other idles (0.5-11.5 s, ~5 s on average, in 4 x 20 x 5,000-step sweeps, 2 workers:
    benchmarks/README.md). Here, in a trial's last stretch (see :func:`yields_in_last_stretch`), it also yields
    after a plain iteration to a waiting trial with more iterations left; the next trial to run is the one with
    the most left, counted in iterations actually trained. Exploit and explore are PBT's own. Asynchronous only:
    synchronous PBT already waits for everyone at its boundaries.
    """

    def __init__(self, *args: Any, stop_iteration: int, switch_seconds: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._synch:
            raise ValueError("EvenFinish levels asynchronous PBT/PB2; synchronous PBT waits at its boundaries already")
        self._stop_iteration = stop_iteration
        self._switch_seconds = TRIAL_SWITCH_SECONDS if switch_seconds is None else switch_seconds
        self._trained: dict[Trial, int] = {}  # iterations each trial has trained (its restored checkpoint's)
        self._yielding: set[Trial] = set()  # told to pause here, not paused yet (saving their checkpoint)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # Also a failed trial put back in the queue: it resumes from its last checkpoint, maybe a few iterations
        # back, so its count is unknown until its next result (0 until then: it is behind, let it run first).
        self._trained.pop(trial, None)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if self._time_attr not in result:
            return decision
        # An exploited trial (NOOP: PBT paused it onto its donor's checkpoint) resumes at the donor's iteration.
        exploited = decision == TrialScheduler.NOOP
        self._trained[trial] = int(self._trial_state[trial].last_train_time if exploited else result[self._time_attr])
        if decision != TrialScheduler.CONTINUE:
            return decision
        trials = tune_controller.get_trials()
        waiting = waiting_trials(trials)
        running = sum(t.status == Trial.RUNNING for t in trials)
        self._yielding = {t for t in self._yielding if t.status == Trial.RUNNING and t is not trial}
        trained = self._trained[trial]
        left = self._stop_iteration - trained
        next_boundary = self._trial_state[trial].last_perturbation_time + self._perturbation_interval
        if (
            waiting
            and levelling_pays(float(result.get("time_this_iter_s", 0.0)), len(trials), max(running, 1), self._switch_seconds)
            and yields_in_last_stretch(left, next_boundary - trained,
                                       [self._stop_iteration - self._trained_by(t) for t in waiting], len(self._yielding))
        ):
            self._yielding.add(trial)
            return TrialScheduler.PAUSE
        return decision

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        return min(waiting_trials(tune_controller.get_trials()), key=self._trained_by, default=None)

    def _trained_by(self, trial: Trial) -> int:
        return self._trained.get(trial, 0)


class EvenFinishPBT(EvenFinish, SeededPBT):
    """:class:`SeededPBT` with :class:`EvenFinish`'s end-of-sweep levelling."""


def build_scheduler(section: PBTSection, metric: str, mode: str):
    """PBT / PB2 over ``lr`` with the section's interval, quantile and mutation settings; None for baselines.

    Asynchronous PBT/PB2 levels the population at the end (:class:`EvenFinish`) unless ``even_finish`` is off.
    """
    shared = dict(
        time_attr="training_iteration",
        metric=metric,
        mode=mode,
        perturbation_interval=section.perturbation_interval,
        quantile_fraction=section.quantile_fraction,
        synch=section.synch,
    )
    # Synchronous PBT already waits for every trial at each boundary: Tune's own scheduler, its draws seeded.
    levelled = {"stop_iteration": section.iterations} if section.even_finish and not section.synch else {}
    if section.scheduler == "pbt":
        return (EvenFinishPBT if levelled else SeededPBT)(
            hyperparam_mutations={"lr": tune.loguniform(section.lr_min, section.lr_max)},
            resample_probability=section.resample_probability,
            perturbation_factors=tuple(section.perturbation_factors),
            seed=section.seed,
            **shared,
            **levelled,
        )
    if section.scheduler == "pb2":
        # PB2 (Parker-Holder et al. 2020) explores with a GP bandit inside the bounds instead of random factors.
        # Both modules import GPy/sklearn: only when asked for.
        from ray.tune.schedulers.pb2 import PB2

        from metaopt.pbt import pb2

        scheduler_cls = pb2.EvenFinishPB2 if levelled else PB2
        return scheduler_cls(hyperparam_bounds={"lr": [section.lr_min, section.lr_max]}, **shared, **levelled)
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
    checkpoints_to_keep: int = 2,
) -> tune.Tuner:
    """A Tuner whose trials are LRTrainable over the section's lr space; the whole section rides in config.
    Each trial keeps its last ``checkpoints_to_keep`` checkpoints (and any PBT may still restore)."""
    scheduler = build_scheduler(section, metric, mode)
    grid = section.scheduler == "grid"
    if scheduler is not None:
        search, callbacks = actor_keeping_search(section.seed, callbacks)
    else:
        search = None if grid else seeded_random_search(section.seed)
    checkpoints, callbacks = checkpoint_config(section.checkpoint_every, checkpoints_to_keep, scheduler, callbacks)
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
            checkpoint_config=checkpoints,
            failure_config=tune.FailureConfig(max_failures=section.max_failures),
            callbacks=callbacks,
            verbose=verbose,
        ),
    )
