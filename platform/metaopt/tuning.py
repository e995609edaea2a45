"""The Tune set-up shared by the capabilities whose trials are a grid (federated, posttrain): one Tuner with a
checkpoint every iteration, a failure budget, and optionally synchronous PBT over the trial config's ``lr``;
and the search algorithm that lets trials keep their actors (PBT sweeps of ``metaopt.pbt`` use it too)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search import BasicVariantGenerator

STATE_FILE = "trial_state.pt"


def save_state(state: dict[str, Any], checkpoint_dir: str) -> str:
    """A trainable's state (``torch.save``) into its Tune checkpoint directory."""
    import torch

    torch.save(state, Path(checkpoint_dir) / STATE_FILE)
    return checkpoint_dir


def load_state(checkpoint: str | dict) -> dict[str, Any]:
    """What :func:`save_state` wrote; Tune passes the directory, or a dict holding it."""
    import torch

    directory = Path(checkpoint if isinstance(checkpoint, str) else checkpoint["checkpoint_dir"])
    return torch.load(directory / STATE_FILE, weights_only=False)


def lr_pbt(metric: str, interval: int, low: float, high: float) -> Any:
    """Synchronous PBT on ``metric`` (max) every ``interval`` iterations; explore draws ``lr`` log-uniformly
    from [low, high] or perturbs it (Jaderberg et al. 2017)."""
    from ray.tune.schedulers import PopulationBasedTraining

    return PopulationBasedTraining(time_attr="training_iteration", metric=metric, mode="max",
                                   perturbation_interval=interval,
                                   hyperparam_mutations={"lr": tune.loguniform(low, high)}, synch=True)


def grid_tuner(trainable: Any, trial_resources: Any, param_space: dict[str, Any], *, iterations: int,
               scheduler: Any, max_failures: int, experiment_name: str, storage_path: str,
               max_concurrent_trials: int | None, callbacks: list[Any], verbose: int = 0,
               reuse_actors: bool = False, cells: list[dict[str, Any]] | None = None) -> Any:
    """A Tuner over ``param_space`` with ``iterations`` per trial and a checkpoint after every iteration (all of
    them kept under PBT, which restores any peer's; the last two otherwise). ``reuse_actors``: the trainable
    implements ``reset_config`` and Tune hands its actor (and placement group) from trial to trial.
    ``cells``: the trials' values of ``param_space``'s sampled keys, one dict per trial, run in this order
    (instead of ``grid_search`` keys, which Tune orders by name)."""
    search = None
    if reuse_actors or cells:
        search, callbacks = actor_keeping_search(0, callbacks, cells)
    # A checkpoint every iteration with num_to_keep makes Tune snapshot its (local, ~10 ms) experiment state every
    # few iterations, and warn about it each time: with rounds of well under a second that is a warning per round.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    return tune.Tuner(
        tune.with_resources(trainable, trial_resources),
        param_space=param_space,
        # PBT must see the whole population (a concurrency limit would hide the trials not started yet); the
        # resources still decide how many train at once, and PBT pauses trials at its synchronous boundaries.
        tune_config=tune.TuneConfig(max_concurrent_trials=None if scheduler else max_concurrent_trials,
                                    reuse_actors=reuse_actors, scheduler=scheduler, search_alg=search,
                                    num_samples=len(cells) if cells else 1),
        run_config=tune.RunConfig(
            name=experiment_name, storage_path=storage_path, stop={"training_iteration": iterations},
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, checkpoint_at_end=True,
                                                    num_to_keep=None if scheduler else 2),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=callbacks, verbose=verbose,
        ),
    )


def _variant_seed(seed: int) -> int:
    # Seeding the variant generator makes the initial population reproducible from the logged config.
    return int(np.random.default_rng(seed).integers(2**31 - 1))


def seeded_random_search(seed: int):
    return BasicVariantGenerator(random_state=_variant_seed(seed))


class PopulationSearch(BasicVariantGenerator):
    """A seeded trial generator that is finished only when every trial has finished (PBT sweeps, and grids
    whose trainables are reused across trials).

    Tune (2.60) keeps an idle actor for reuse only while its search algorithm says more trials may come or a
    trial is staged. Once the population has been generated, a trial PBT pauses (an exploit, a synchronous
    barrier) therefore loses its actor, and resuming it starts a fresh worker process that imports torch and
    Ray Tune again (seconds of CPU on a small machine, measured in benchmarks/pbt_overhead.py; a federated
    trial also restarts its client actors). Reporting "finished" only at the end lets paused trials keep, and
    resume on, their actors. :class:`TrialsLeft` tells it at every step of Tune's loop whether any trial is
    left (it survives an experiment restore, where completed trials are not reported again).
    """

    def __init__(self, seed: int, points_to_evaluate: list[dict[str, Any]] | None = None) -> None:
        super().__init__(random_state=_variant_seed(seed), points_to_evaluate=points_to_evaluate)
        self.trials_left = True

    def is_finished(self) -> bool:
        return super().is_finished() and not self.trials_left


class TrialsLeft(tune.Callback):
    """Keeps :attr:`PopulationSearch.trials_left` current; registered before every other callback."""

    def __init__(self, search: PopulationSearch) -> None:
        self.search = search

    def _update(self, trials: list[Any]) -> None:
        self.search.trials_left = any(not t.is_finished() for t in trials)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._update(trials)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._update(trials)


def actor_keeping_search(seed: int, callbacks: list[Any],
                         cells: list[dict[str, Any]] | None = None) -> tuple[PopulationSearch, list[Any]]:
    """The search algorithm of a Tuner whose trials reuse actors -- a :class:`PopulationSearch`, so a paused or
    finished trial's actor waits for the next trial, over ``cells`` in order when given -- and the callbacks
    with its :class:`TrialsLeft` first."""
    search = PopulationSearch(seed, cells)
    return search, [TrialsLeft(search), *callbacks]
