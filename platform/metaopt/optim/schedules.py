"""Learning-rate schedules: plain ``step -> lr`` functions (:data:`Schedule`), and the specs that name them.

Every schedule is built from a validated pydantic model (one per schedule, its own fields, bounds and
defaults), so a bad experiment file or a bad factory argument fails before any training starts, with a
one-line :class:`~metaopt.errors.ConfigError` naming the field. The returned schedules are
:func:`functools.partial` objects over module-level functions: they are pure, cheap to call once per
optimizer step, and picklable with the standard library (Ray checkpoints, multiprocessing) without cloudpickle.

Semantics follow optax (``optax.linear_schedule``, ``optax.cosine_decay_schedule``,
``optax.warmup_cosine_decay_schedule``, ``optax.piecewise_constant_schedule``), which
the tests use as the oracle:

* steps are optimizer steps counted from 0; a negative step is treated as step 0;
* decaying schedules reach ``end_lr`` at ``total_steps`` and stay there afterwards;
* :func:`warmup` ramps linearly from 0 to the wrapped schedule's *first* value over
  ``warmup_steps`` steps and then plays the wrapped schedule from its step 0, i.e.
  shifted right by ``warmup_steps`` (``optax.join_schedules`` semantics).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

from pydantic import Field, ValidationError, model_validator

from metaopt.config import StrictModel, first_error, quote
from metaopt.errors import ConfigError
from metaopt.optim.specs import Integer, LearningRate, NamedSpec, NamedSpecs, Number, StepCount

__all__ = [
    "SCHEDULES",
    "SCHEDULE_NAMES",
    "Schedule",
    "ScheduleSpec",
    "build_schedule",
    "constant",
    "cosine",
    "linear_decay",
    "piecewise_constant",
    "warmup",
]

#: A learning-rate schedule: optimizer step -> learning rate.
Schedule = Callable[[int], float]


# ---------------------------------------------------------------------------
# Schedule values. Module-level (not closures) so that partials of them pickle.
# ---------------------------------------------------------------------------


def _constant_value(lr: float, step: int) -> float:
    return lr


def _linear_value(lr: float, total_steps: int, end_lr: float, step: int) -> float:
    fraction = min(max(step, 0), total_steps) / total_steps
    return lr + (end_lr - lr) * fraction


def _cosine_value(lr: float, total_steps: int, end_lr: float, step: int) -> float:
    fraction = min(max(step, 0), total_steps) / total_steps
    return end_lr + (lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def _warmup_value(schedule: Schedule, warmup_steps: int, peak_lr: float, step: int) -> float:
    step = max(step, 0)
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return float(schedule(step - warmup_steps))


def _piecewise_value(starts: tuple[int, ...], lrs: tuple[float, ...], step: int) -> float:
    # starts[0] == 0, so for step >= 0 the index is never -1.
    return lrs[bisect.bisect_right(starts, max(step, 0)) - 1]


# ---------------------------------------------------------------------------
# Specs: one model per schedule. ``build`` returns the schedule the spec describes.
# ---------------------------------------------------------------------------


class _WithWarmup(NamedSpec):
    warmup_steps: StepCount = Field(
        default=0, description="Linear warm-up from 0 to lr over this many steps, counted inside total_steps."
    )


class ConstantSchedule(_WithWarmup):
    """The same learning rate at every step (``optax.constant_schedule``)."""

    name: Literal["constant"] = "constant"
    lr: LearningRate

    def build(self) -> Schedule:
        return warmup(functools.partial(_constant_value, self.lr), self.warmup_steps)


class _Decay(_WithWarmup):
    """From ``lr`` at step 0 to ``end_lr`` at ``total_steps`` (the warm-up included), then flat."""

    lr: LearningRate
    total_steps: Integer = Field(ge=1, description="Steps to reach end_lr, the warm-up included.")
    end_lr: Number = Field(default=0.0, ge=0, description="Learning rate from total_steps on.")

    @model_validator(mode="after")
    def _warmup_inside_total(self) -> _Decay:
        # Warm-up is part of the total (optax.warmup_cosine_decay_schedule), so the decay keeps at least one step.
        if self.warmup_steps >= self.total_steps:
            raise ConfigError(
                "warmup_steps", f"must be < total_steps ({self.total_steps}), got {quote(self.warmup_steps)}"
            )
        return self


class LinearDecaySchedule(_Decay):
    """Linear interpolation (``optax.linear_schedule``)."""

    name: Literal["linear_decay"] = "linear_decay"

    def build(self) -> Schedule:
        decay = functools.partial(_linear_value, self.lr, self.total_steps - self.warmup_steps, self.end_lr)
        return warmup(decay, self.warmup_steps)


class CosineSchedule(_Decay):
    """Half-cosine decay (Loshchilov & Hutter 2017, "SGDR", one cycle, no restart)."""

    name: Literal["cosine"] = "cosine"

    def build(self) -> Schedule:
        decay = functools.partial(_cosine_value, self.lr, self.total_steps - self.warmup_steps, self.end_lr)
        return warmup(decay, self.warmup_steps)


class Segment(NamedTuple):
    """``lr`` holds from ``start_step`` until the next segment starts."""

    start_step: StepCount
    lr: LearningRate


class PiecewiseConstantSchedule(NamedSpec):
    """Constant segments, replayed literally (no warm-up): a schedule discovered by PBT."""

    name: Literal["piecewise_constant"] = "piecewise_constant"
    boundaries_and_lrs: list[Segment] = Field(min_length=1, description="[[start_step, lr], ...], first start 0.")

    @model_validator(mode="after")
    def _increasing_from_zero(self) -> PiecewiseConstantSchedule:
        # Strictly increasing from 0, so the segments are sorted, none is empty, and every step has one lr.
        starts = [segment.start_step for segment in self.boundaries_and_lrs]
        if starts[0] != 0:
            raise ConfigError(
                "boundaries_and_lrs.0.0", f"must be 0 (the first segment opens the schedule), got {quote(starts[0])}"
            )
        for i in range(1, len(starts)):
            if starts[i] <= starts[i - 1]:
                raise ConfigError(
                    f"boundaries_and_lrs.{i}.0",
                    f"must be > {starts[i - 1]} (start steps strictly increase), got {starts[i]}",
                )
        return self

    def build(self) -> Schedule:
        starts, lrs = zip(*self.boundaries_and_lrs)
        return functools.partial(_piecewise_value, tuple(starts), tuple(lrs))


#: The schedules, by name: the one list of their names.
SCHEDULES: NamedSpecs[Any] = NamedSpecs("schedule")
for _model in (ConstantSchedule, LinearDecaySchedule, CosineSchedule, PiecewiseConstantSchedule):
    SCHEDULES.register(_model.model_fields["name"].default, _model)

SCHEDULE_NAMES = SCHEDULES.names()

#: A config field holding a schedule spec (``ScheduleSpec | None`` is spelled ``OptionalScheduleSpec``).
ScheduleSpec = SCHEDULES.field_type()
OptionalScheduleSpec = SCHEDULES.field_type(optional=True)


def build_schedule(spec: Any) -> Schedule:
    """Build a schedule from a spec such as ``{"name": "cosine", "lr": 0.1, "total_steps": 1000}`` (a mapping
    or its model).

    Keys are the schedule model's fields: ``name`` (one of :data:`SCHEDULE_NAMES`), the factory's arguments
    and an optional ``warmup_steps`` (not for ``piecewise_constant``, which replays literally). With warm-up,
    ``total_steps`` is the *whole* length including the warm-up, as in ``optax.warmup_cosine_decay_schedule``:
    the decay takes ``total_steps - warmup_steps`` steps and every step from ``total_steps`` on gets
    ``end_lr``. Errors name the field as ``schedule.<key>``.
    """
    return SCHEDULES.parse(spec).build()


# ---------------------------------------------------------------------------
# Factories: the same models, called with arguments; errors name the argument.
# ---------------------------------------------------------------------------


def _checked(model: type[StrictModel], **arguments: Any) -> Any:
    try:
        return model(**arguments)
    except ValidationError as err:
        raise first_error("", model, err) from None


def constant(lr: float) -> Schedule:
    """The same learning rate at every step (``optax.constant_schedule``)."""
    return _checked(ConstantSchedule, lr=lr).build()


def linear_decay(lr: float, total_steps: int, end_lr: float = 0.0) -> Schedule:
    """Linear interpolation from ``lr`` at step 0 to ``end_lr`` at ``total_steps``, then flat.

    Same values as ``optax.linear_schedule(lr, end_lr, total_steps)``.
    """
    return _checked(LinearDecaySchedule, lr=lr, total_steps=total_steps, end_lr=end_lr).build()


def cosine(lr: float, total_steps: int, end_lr: float = 0.0) -> Schedule:
    """Half-cosine decay from ``lr`` to ``end_lr`` over ``total_steps``, then flat.

    Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts"
    (one cycle, no restart). Same values as
    ``optax.cosine_decay_schedule(lr, total_steps, alpha=end_lr / lr)``.
    """
    return _checked(CosineSchedule, lr=lr, total_steps=total_steps, end_lr=end_lr).build()


class _Warmup(StrictModel):
    warmup_steps: StepCount


def warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """Prepend a linear warm-up from 0 to ``schedule(0)`` lasting ``warmup_steps`` steps.

    Step ``s < warmup_steps`` gets ``schedule(0) * s / warmup_steps``; step
    ``s >= warmup_steps`` gets ``schedule(s - warmup_steps)``: the wrapped schedule is
    *shifted*, so it runs in full after the warm-up (Goyal et al. 2017, "Accurate, Large
    Minibatch SGD", gradual warm-up). Hence ``warmup(cosine(peak, D - W, end), W)``
    equals ``optax.warmup_cosine_decay_schedule(0.0, peak, W, D, end)``.
    ``warmup_steps == 0`` returns ``schedule`` unchanged.
    """
    if not callable(schedule):
        raise ConfigError("schedule", f"must be a callable step -> lr, got {quote(schedule)}")
    warmup_steps = _checked(_Warmup, warmup_steps=warmup_steps).warmup_steps
    if warmup_steps == 0:
        return schedule
    return functools.partial(_warmup_value, schedule, warmup_steps, float(schedule(0)))


def piecewise_constant(boundaries_and_lrs: Iterable[Sequence[float]]) -> Schedule:
    """Constant segments ``[(start_step, lr), ...]``: ``lr`` holds from ``start_step`` on.

    Start steps must be strictly increasing and the first must be 0, so every step has
    exactly one learning rate. Used to replay a schedule discovered by PBT
    (Jaderberg et al. 2017, "Population Based Training of Neural Networks"). Same values
    as ``optax.piecewise_constant_schedule`` with the jumps written as ratios.
    """
    segments = list(boundaries_and_lrs) if isinstance(boundaries_and_lrs, Iterable) else boundaries_and_lrs
    return _checked(PiecewiseConstantSchedule, boundaries_and_lrs=segments).build()
