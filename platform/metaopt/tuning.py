"""The Tune set-up every capability shares: the sweep's settings from the session (:class:`SweepSettings`) and
its run config; for the capabilities whose trials are a grid (federated, posttrain, objectives, symbolic) one
Tuner with a checkpoint every few iterations, a failure budget, and optionally synchronous PBT over the trial
config's ``lr``; the search algorithm that lets trials keep their actors (PBT sweeps of ``metaopt.pbt`` use it
too); and the checkpoint files of every capability: written atomically, read without running pickled code, the
last few kept."""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator

from metaopt.cache import replace_atomically
from metaopt.compat import numpy as compat_numpy
from metaopt.compat import tune as compat_tune

STATE_FILE = "trial_state.pt"
T = TypeVar("T")
logger = logging.getLogger(__name__)


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or holds objects ``weights_only`` refuses."""


def save_state(state: dict[str, Any], checkpoint_dir: str, name: str = STATE_FILE) -> str:
    """A trainable's state (``torch.save``) into its Tune checkpoint directory, atomically: a trial killed in
    the middle of the write leaves the previous file whole."""
    import torch

    replace_atomically(Path(checkpoint_dir) / name, lambda tmp: torch.save(state, tmp))
    return checkpoint_dir


def checkpoint_dir(checkpoint: str | dict) -> Path:
    """The folder of the checkpoint Tune hands ``load_checkpoint``: the path, or a dict holding it."""
    return Path(checkpoint if isinstance(checkpoint, str) else checkpoint["checkpoint_dir"])


def load_state(checkpoint: str | dict, name: str = STATE_FILE) -> dict[str, Any]:
    """What :func:`save_state` wrote (see :func:`read_state`)."""
    return read_state(checkpoint_dir(checkpoint) / name)


def read_state(path: Path) -> dict[str, Any]:
    """A ``torch.save`` state loaded with ``weights_only=True``: tensors, primitive containers and numpy arrays
    only, so a tampered checkpoint cannot run code when it is loaded. :class:`UnreadableCheckpoint` otherwise."""
    import torch

    def parse(handle_path: Path) -> dict[str, Any]:
        with torch.serialization.safe_globals(compat_numpy.array_globals()):
            return torch.load(handle_path, weights_only=True, map_location="cpu")

    return read_checkpoint_file(path, parse)


def read_checkpoint_file(path: Path, parse: Callable[[Path], T]) -> T:
    """``parse(path)``, or :class:`UnreadableCheckpoint` with one line naming the file and what is wrong."""
    if not path.is_file():
        raise UnreadableCheckpoint(f"checkpoint file {path} is missing")
    try:
        return parse(path)
    except Exception as err:  # any parser's error: truncated zip, bad JSON/msgpack, a refused global
        raise UnreadableCheckpoint(f"checkpoint file {path} cannot be read: {gist(err)}") from err


def gist(err: Exception) -> str:
    """The line of a parser's error that says what is wrong (torch's weights_only refusal is a page long and
    names the refused global on its ``WeightsUnpickler error`` line), without terminal colour codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line] or [type(err).__name__]
    line = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
    return line if len(line) <= 300 else line[:297] + "..."


class KeepLastCheckpoints(tune.Callback):
    """Deletes a trial's checkpoints older than its last ``keep`` ones, except any PBT may still restore.

    Used instead of Tune's ``num_to_keep`` under PBT, where a trial that exploits a peer restores the checkpoint
    PBT recorded at the peer's perturbation boundary, possibly after the peer saved several more (a trial that
    waits for a free worker). Tune's ``num_to_keep`` would delete it; here a checkpoint stays while the
    scheduler still records it as a trial's last (boundary) checkpoint or any trial's latest points at it (an
    exploiting trial not restored yet, a failed trial to restart). So a trial keeps at most ``keep`` + 1 of its
    own checkpoints at the end of a sweep, however many iterations it ran.
    """

    def __init__(self, keep: int, scheduler: Any = None) -> None:
        self.keep = keep
        self.scheduler = scheduler
        self.saved: dict[str, list[Any]] = {}  # trial id -> its checkpoints seen, oldest first

    def on_checkpoint(self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any) -> None:
        saved = [c for c in self.saved.get(trial.trial_id, []) if c.path != checkpoint.path] + [checkpoint]
        older, recent = saved[: -self.keep], saved[-self.keep :]
        if older:
            # This trial's latest is about to be ``checkpoint`` (Tune registers it after its callbacks).
            wanted = restorable_paths([t for t in trials if t is not trial], self.scheduler)
            older = [c for c in older if c.path in wanted or not delete_checkpoint(c)]
        self.saved[trial.trial_id] = older + recent


def restorable_paths(trials: list[Any], scheduler: Any) -> set[str]:
    """Checkpoint paths Tune may still restore: every trial's latest, and PBT's recorded boundary checkpoints."""
    paths = {t.checkpoint.path for t in trials if t.checkpoint is not None}
    if scheduler is not None and compat_tune.pbt_state_readable(scheduler):
        paths |= {recorded.path for recorded in compat_tune.pbt_recorded_checkpoints(scheduler)}
    return paths


def delete_checkpoint(checkpoint: Any) -> bool:
    """Remove a checkpoint folder from its (local or remote) file system; False if it could not be removed."""
    try:
        checkpoint.filesystem.delete_dir(checkpoint.path)
        return True
    except FileNotFoundError:
        return True
    except OSError as err:
        logger.warning("could not delete old checkpoint %s: %s", checkpoint.path, err)
        return False


def checkpoint_config(frequency: int, keep: int, scheduler: Any, callbacks: list[Any]) -> tuple[Any, list[Any]]:
    """Tune's checkpoint config keeping ``keep`` checkpoints per trial, and the callbacks: under PBT the
    deleting is :class:`KeepLastCheckpoints`' (which knows what PBT may restore), otherwise Tune's own."""
    pbt = isinstance(scheduler, PopulationBasedTraining)  # PB2 too
    config = tune.CheckpointConfig(
        checkpoint_frequency=frequency, checkpoint_at_end=True, num_to_keep=None if pbt else keep
    )
    if pbt and not compat_tune.pbt_state_readable(scheduler):
        # Plain fallback where a Tune release changed it: keep every checkpoint (disk, not results, is at stake).
        return config, callbacks
    return config, [*callbacks, KeepLastCheckpoints(keep, scheduler)] if pbt else callbacks


@contextmanager
def seeded_randomness(*key: Any) -> Iterator[None]:
    """Python's and numpy's global generators seeded from ``key`` inside the block, and put back after it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    text = "|".join(map(str, key))
    random.seed(text)
    np.random.seed(random.getrandbits(32))
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class SeededDecisions(compat_tune.ExploitHook):
    """PBT (a mixin in front of Tune's scheduler) whose random choices -- which top trial a weak one clones, how
    it perturbs or resamples the hyperparameters -- follow from the sweep's ``seed``, the trial and the
    iteration, instead of the driver's global ``random``/``numpy`` state, which Ray and Tune also draw from.
    So a synchronous PBT sweep is reproducible from its seed, and one with a crashed and restored trial ends
    as the uninterrupted one does. (Tune's exploit step is private: :class:`metaopt.compat.tune.ExploitHook`
    reaches it, and on a Tune version it does not know the choices are plain PBT's, unseeded, said once.)"""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._decision_seed = seed

    def exploit_context(self, trial: Any, iteration: int) -> AbstractContextManager[None]:
        tag = str(trial.experiment_tag).split("@")[0]  # the trial's original tag, the same in every rerun
        return seeded_randomness(self._decision_seed, tag, iteration)


class SeededPBT(SeededDecisions, PopulationBasedTraining):
    """Tune's PBT (Jaderberg et al. 2017) whose exploit/explore choices follow from the sweep's seed."""


def lr_pbt(metric: str, interval: int, low: float, high: float, seed: int = 0) -> Any:
    """Synchronous PBT on ``metric`` (max) every ``interval`` iterations; explore draws ``lr`` log-uniformly
    from [low, high] or perturbs it (Jaderberg et al. 2017), its choices seeded by ``seed``."""
    return SeededPBT(
        time_attr="training_iteration",
        metric=metric,
        mode="max",
        perturbation_interval=interval,
        hyperparam_mutations={"lr": tune.loguniform(low, high)},
        synch=True,
        seed=seed,
    )


@dataclass(frozen=True)
class SweepSettings:
    """What every capability's Tuner takes from the session and the experiment's ``ray`` section, whatever its
    trials are; built once per sweep by :func:`metaopt.session.sweep_settings`.

    ``experiment_name``: Tune's folder under ``storage_path`` (the sweep's run name, unique per sweep).
    ``storage_path``: where Tune keeps trial results and checkpoints (``ray.storage_path``, resolved).
    ``resources``: one trial's own slot (``ray.*_per_trial``); a capability may add bundles for its actors.
    ``max_concurrent_trials``: how many trials run at once (``ray.max_concurrent_trials``; None: as many as fit).
    ``callbacks``: Tune callbacks (MLflow trial runs, progress lines, the caller's own), in order.
    ``verbose``: Tune's own verbosity (0 quiet, 1 Tune's status table).
    ``checkpoints_to_keep``: how many checkpoints each trial keeps (``ray.checkpoints_to_keep``).
    """

    experiment_name: str
    storage_path: str
    resources: dict[str, float]
    max_concurrent_trials: int | None
    callbacks: tuple[Any, ...] = ()
    verbose: int = 0
    checkpoints_to_keep: int = 2


def run_config(
    sweep: SweepSettings, *, iterations: int, checkpoints: Any, max_failures: int, callbacks: list[Any]
) -> Any:
    """Tune's run config of a sweep: ``iterations`` per trial (Tune's ``training_iteration``, the clock
    synchronous PBT waits on), the checkpoint config and ``callbacks`` as :func:`checkpoint_config` made them."""
    return tune.RunConfig(
        name=sweep.experiment_name,
        storage_path=sweep.storage_path,
        stop={"training_iteration": iterations},
        checkpoint_config=checkpoints,
        failure_config=tune.FailureConfig(max_failures=max_failures),
        callbacks=callbacks,
        verbose=sweep.verbose,
    )


def grid_tuner(
    trainable: Any,
    trial_resources: Any,
    param_space: dict[str, Any],
    *,
    iterations: int,
    scheduler: Any,
    max_failures: int,
    sweep: SweepSettings,
    reuse_actors: bool = False,
    cells: list[dict[str, Any]] | None = None,
    checkpoint_every: int = 1,
) -> Any:
    """A Tuner over ``param_space`` with ``iterations`` per trial and a checkpoint every ``checkpoint_every``
    iterations and at the end (the last ``sweep.checkpoints_to_keep`` kept, see :func:`checkpoint_config`).
    ``trial_resources``: ``sweep.resources`` as the capability shapes them (bundles for its actors).
    ``reuse_actors``: the trainable implements ``reset_config`` and Tune hands its actor (and placement group)
    from trial to trial.
    ``cells``: the trials' values of ``param_space``'s sampled keys, one dict per trial, run in this order
    (instead of ``grid_search`` keys, which Tune orders by name)."""
    search, callbacks = None, list(sweep.callbacks)
    if reuse_actors or cells:
        search, callbacks = actor_keeping_search(0, callbacks, cells)
    checkpoints, callbacks = checkpoint_config(checkpoint_every, sweep.checkpoints_to_keep, scheduler, callbacks)
    # A checkpoint every iteration with num_to_keep makes Tune snapshot its (local, quick) experiment state every
    # few iterations, and warn about it each time: with rounds of well under a second that is a warning per round.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    return tune.Tuner(
        tune.with_resources(trainable, trial_resources),
        param_space=param_space,
        # PBT must see the whole population (a concurrency limit would hide the trials not started yet); the
        # resources still decide how many train at once, and PBT pauses trials at its synchronous boundaries.
        tune_config=tune.TuneConfig(
            max_concurrent_trials=None if scheduler else sweep.max_concurrent_trials,
            reuse_actors=reuse_actors,
            scheduler=scheduler,
            search_alg=search,
            num_samples=len(cells) if cells else 1,
        ),
        run_config=run_config(
            sweep, iterations=iterations, checkpoints=checkpoints, max_failures=max_failures, callbacks=callbacks
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


def actor_keeping_search(
    seed: int, callbacks: list[Any], cells: list[dict[str, Any]] | None = None
) -> tuple[PopulationSearch, list[Any]]:
    """The search algorithm of a Tuner whose trials reuse actors -- a :class:`PopulationSearch`, so a paused or
    finished trial's actor waits for the next trial, over ``cells`` in order when given -- and the callbacks
    with its :class:`TrialsLeft` first."""
    search = PopulationSearch(seed, cells)
    return search, [TrialsLeft(search), *callbacks]
