"""Ray Tune's private internals, behind one door (written against ``ray==2.60.*``).

What we take from Tune beyond its public API, each with a plain fallback:

- ``set_iteration``: a class trainable's iteration counter lives in the private ``Trainable._iteration``. After a
  restore Tune sets it from the result it *associated* with the checkpoint, which can be older than the weights
  (Ray 2.60 may hand an exploiting PBT trial a later checkpoint of a still-running clone), so our trainables
  overwrite it with the iteration saved inside the checkpoint.

  Fallback (attribute gone, or another Tune version): leave Tune's own count. Tune then counts on from the
  iteration it restored from the checkpoint's result (0 when there is none), which is never *ahead* of the
  checkpoint's own iteration: such a trial trains a few iterations past its budget before
  ``stop={"training_iteration": ...}`` ends it. That costs time and a few extra steps/rounds/generations for that
  trial only; the metrics it reports (``step``, ``round``, ``generation``, ...) still come from the trainable's
  own state, and the symbolic search stops itself on its own iteration count, so it is exact either way.
- ``pbt_state_readable`` / ``pbt_recorded_checkpoints`` / ``pbt_last_train_time`` / ``pbt_last_perturbation_time``:
  PBT's per-trial bookkeeping (``PopulationBasedTraining._trial_state``), read by the checkpoint retention
  (:class:`metaopt.tuning.KeepLastCheckpoints`) and the end-of-sweep levelling (:mod:`metaopt.even_finish`).
  Fallback: every checkpoint of a PBT sweep is kept (disk, not results, is at stake) and the end is not levelled
  (Tune's own turn-taking: the last trial may train alone for part of a turn; :class:`metaopt.even_finish.EvenFinish`
  says why that matters).
- ``ExploitHook``: runs PBT's private exploit/explore step (``_checkpoint_or_exploit``) inside a context, which
  :class:`metaopt.tuning.SeededDecisions` uses to seed its random choices. Fallback: plain PBT, choices unseeded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from metaopt.compat import private_api_usable, warn_fallback

WRITTEN_FOR = "==2.60.*"
"""The Ray versions (``ray`` distribution, which ships Tune) whose private internals this module uses."""

_ITERATION = "_iteration"


def set_iteration(trainable: Any, iteration: int) -> None:
    """Make a Tune class trainable count on from ``iteration`` (call it in ``load_checkpoint``).

    With the Tune version we were written for this writes the private ``_iteration`` that ``Trainable.train``
    increments and reports as ``training_iteration``; elsewhere it warns once and leaves Tune's count (see the
    module docstring for what that costs).
    """
    if private_api_usable("ray", WRITTEN_FOR, (trainable, _ITERATION)):
        setattr(trainable, _ITERATION, int(iteration))
        return
    warn_fallback(
        "tune.set_iteration",
        f"metaopt.compat.tune: Tune's private Trainable.{_ITERATION} is not usable on this Ray version "
        f"(written for ray{WRITTEN_FOR}); a restored trial counts its iterations from Tune's checkpoint "
        "result instead and may train a few iterations past its budget",
    )


# ---------------------------------------------------------------------------------------------------------------
# PBT's per-trial bookkeeping (``PopulationBasedTraining._trial_state``: trial -> ``_PBTTrialState``)

_PBT_STATE = "_trial_state"


def pbt_state_readable(scheduler: Any) -> bool:
    """Whether PBT's per-trial bookkeeping can be read on ``scheduler`` (a Tune PBT or PB2); says once if not."""
    if private_api_usable("ray", WRITTEN_FOR, (scheduler, _PBT_STATE)):
        return True
    warn_fallback(
        "tune.pbt_state",
        f"metaopt.compat.tune: Tune PBT's private {_PBT_STATE} is not usable on this Ray version (written "
        f"for ray{WRITTEN_FOR}): PBT sweeps keep every checkpoint, do not level their end and do not seed "
        "their exploit/explore choices",
    )
    return False


def pbt_recorded_checkpoints(scheduler: Any) -> list[Any]:
    """The checkpoints (each with a ``path``) PBT recorded as its trials' last boundary ones: PBT may still hand
    them to an exploiting trial. A save PBT asked for and that is not done yet (Tune's ``_FutureTrainingResult``)
    is not one we hold, so it is left out. Only where :func:`pbt_state_readable`."""
    checkpoints = []
    for state in getattr(scheduler, _PBT_STATE).values():
        recorded = getattr(state, "last_checkpoint", None)
        if recorded is not None and not hasattr(recorded, "path") and hasattr(recorded, "resolve"):
            resolved = recorded.resolve(block=False)
            recorded = resolved.checkpoint if resolved is not None else None
        if recorded is not None and getattr(recorded, "path", None):
            checkpoints.append(recorded)
    return checkpoints


def pbt_last_train_time(scheduler: Any, trial: Any) -> int:
    """The ``time_attr`` value of the trial's last result PBT looked at (for an exploited trial: its donor's,
    the iteration it resumes at). Only where :func:`pbt_state_readable`."""
    return int(getattr(scheduler, _PBT_STATE)[trial].last_train_time)


def pbt_last_perturbation_time(scheduler: Any, trial: Any) -> float:
    """The ``time_attr`` value at the trial's last perturbation boundary. Only where :func:`pbt_state_readable`."""
    return float(getattr(scheduler, _PBT_STATE)[trial].last_perturbation_time)


# ---------------------------------------------------------------------------------------------------------------
# PBT's exploit/explore step (``PopulationBasedTraining._checkpoint_or_exploit``)

_EXPLOIT_STEP = "_checkpoint_or_exploit"


def exploit_step_hookable() -> bool:
    """Whether :class:`ExploitHook` reaches Tune PBT's exploit/explore step; says once if not."""
    from ray.tune.schedulers import PopulationBasedTraining

    if private_api_usable("ray", WRITTEN_FOR, (PopulationBasedTraining, _EXPLOIT_STEP)):
        return True
    warn_fallback(
        "tune.exploit_step",
        f"metaopt.compat.tune: Tune PBT's private {_EXPLOIT_STEP} is not usable on this Ray version "
        f"(written for ray{WRITTEN_FOR}): PBT's exploit/explore choices are not seeded",
    )
    return False


class ExploitHook:
    """A mixin in front of Tune's PBT (or PB2): each exploit/explore decision of a trial runs inside
    ``self.exploit_context(trial, iteration)``, ``iteration`` being the trial's ``time_attr`` value at that
    result. Override :meth:`exploit_context`. On a Tune version where the step is not ours to wrap, the
    decisions run outside the context, as plain PBT's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._exploit_hooked = exploit_step_hookable() and pbt_state_readable(self)

    def exploit_context(self, trial: Any, iteration: int) -> AbstractContextManager[Any]:
        return nullcontext()

    def _checkpoint_or_exploit(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._exploit_hooked:
            return super()._checkpoint_or_exploit(trial, *args, **kwargs)  # type: ignore[misc]
        with self.exploit_context(trial, pbt_last_train_time(self, trial)):
            return super()._checkpoint_or_exploit(trial, *args, **kwargs)  # type: ignore[misc]
