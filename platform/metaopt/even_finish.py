"""Asynchronous PBT/PB2 whose population finishes together: :class:`EvenFinish`, a mixin in front of Tune's
scheduler, and :class:`EvenFinishPBT` (PB2's variant is :mod:`metaopt.even_finish_pb2`: PB2 imports GPy).

An edge module: it knows Tune's schedulers; what it reads of PBT's private bookkeeping goes through
:mod:`metaopt.compat.tune`, and on a Tune version that module does not know, the population is not levelled
(Tune's own turn-taking, said once).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from metaopt.compat import tune as compat_tune
from metaopt.tuning import SeededPBT

# Handing a reused actor from one trial to another (save, pause, reset_config, restore), per worker process: the
# upper end of what pbt_overhead.py sweeps measured on the 2-core development machine (benchmarks/results.csv).
TRIAL_SWITCH_SECONDS = 0.075

# EvenFinish is a mixin placed before a PBT scheduler in the MRO; the type checker reads its super() calls as PBT's.
if TYPE_CHECKING:
    _SchedulerBase = PopulationBasedTraining
else:
    _SchedulerBase = object


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


def pbt_argument(kwargs: dict[str, Any], name: str) -> Any:
    """A PBT/PB2 constructor argument as the scheduler will see it: given, or Tune's documented default."""
    if name in kwargs:
        return kwargs[name]
    return inspect.signature(PopulationBasedTraining.__init__).parameters[name].default


class EvenFinish(_SchedulerBase):
    """Asynchronous PBT/PB2 whose population finishes together (a mixin in front of the Tune scheduler).

    Tune's asynchronous PBT pauses a trial only at a perturbation boundary when another trial waits, and resumes
    the waiting trial with the least training. With more trials than workers the trials take turns of
    ``perturbation_interval`` iterations, so at the end of a sweep one worker trains the last trial alone for up
    to a turn while the other idles (seconds of a 2-worker benchmarks/pbt_overhead.py sweep; the figures are in
    benchmarks/results.csv). Here, in a trial's last stretch (see :func:`yields_in_last_stretch`), it also yields
    after a plain iteration to a waiting trial with more iterations left; the next trial to run is the one with
    the most left, counted in iterations actually trained. Exploit and explore are PBT's own. Asynchronous only:
    synchronous PBT already waits for everyone at its boundaries.

    The scheduler's ``time_attr``, ``perturbation_interval`` and ``synch`` are read from the constructor's own
    arguments; how far an exploited trial trained and where a trial's next boundary is come from PBT's private
    bookkeeping (:mod:`metaopt.compat.tune`), without which the scheduler behaves as Tune's own.
    """

    def __init__(self, *, stop_iteration: int, switch_seconds: float | None = None, **kwargs: Any) -> None:
        if pbt_argument(kwargs, "synch"):
            raise ValueError("EvenFinish levels asynchronous PBT/PB2; synchronous PBT waits at its boundaries already")
        super().__init__(**kwargs)
        self._stop_iteration = stop_iteration
        self._switch_seconds = TRIAL_SWITCH_SECONDS if switch_seconds is None else switch_seconds
        self._levels_time_attr = pbt_argument(kwargs, "time_attr")
        self._levels_interval = pbt_argument(kwargs, "perturbation_interval")
        self._levelling = compat_tune.pbt_state_readable(self)
        self._trained: dict[Trial, int] = {}  # iterations each trial has trained (its restored checkpoint's)
        self._yielding: set[Trial] = set()  # told to pause here, not paused yet (saving their checkpoint)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # Also a failed trial put back in the queue: it resumes from its last checkpoint, maybe a few iterations
        # back, so its count is unknown until its next result (0 until then: it is behind, let it run first).
        self._trained.pop(trial, None)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if not self._levelling or self._levels_time_attr not in result:
            return decision
        # An exploited trial (NOOP: PBT paused it onto its donor's checkpoint) resumes at the donor's iteration.
        exploited = decision == TrialScheduler.NOOP
        self._trained[trial] = (
            compat_tune.pbt_last_train_time(self, trial) if exploited else int(result[self._levels_time_attr])
        )
        if decision != TrialScheduler.CONTINUE:
            return decision
        trials = tune_controller.get_trials()
        waiting = waiting_trials(trials)
        running = sum(t.status == Trial.RUNNING for t in trials)
        self._yielding = {t for t in self._yielding if t.status == Trial.RUNNING and t is not trial}
        trained = self._trained[trial]
        left = self._stop_iteration - trained
        next_boundary = compat_tune.pbt_last_perturbation_time(self, trial) + self._levels_interval
        if (
            waiting
            and levelling_pays(
                float(result.get("time_this_iter_s", 0.0)), len(trials), max(running, 1), self._switch_seconds
            )
            and yields_in_last_stretch(
                left,
                next_boundary - trained,
                [self._stop_iteration - self._trained_by(t) for t in waiting],
                len(self._yielding),
            )
        ):
            self._yielding.add(trial)
            return TrialScheduler.PAUSE
        return decision

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        if not self._levelling:
            return super().choose_trial_to_run(tune_controller)
        return min(waiting_trials(tune_controller.get_trials()), key=self._trained_by, default=None)

    def _trained_by(self, trial: Trial) -> int:
        return self._trained.get(trial, 0)


class EvenFinishPBT(EvenFinish, SeededPBT):
    """:class:`SeededPBT` with :class:`EvenFinish`'s end-of-sweep levelling."""
