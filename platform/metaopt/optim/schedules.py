"""Learning-rate schedules: plain ``step -> lr`` functions (:data:`metaopt.tasks.base.Schedule`).

Every factory checks its arguments when the schedule is *built*, so a bad experiment
file fails before any training starts, with a one-line :class:`~metaopt.errors.ConfigError`
naming the argument and the allowed range. The returned schedules are
:func:`functools.partial` objects over module-level functions: they are pure, cheap to
call once per optimizer step, and picklable with the standard library (Ray checkpoints,
multiprocessing) without cloudpickle.

Semantics follow optax (``optax.linear_schedule``, ``optax.cosine_decay_schedule``,
``optax.warmup_cosine_decay_schedule``, ``optax.piecewise_constant_schedule``), which
the tests use as the oracle:

* steps are optimizer steps counted from 0; a negative step is treated as step 0;
* decaying schedules reach ``end_lr`` at ``total_steps`` and stay there afterwards;
* :func:`warmup` ramps linearly from 0 to the wrapped schedule's *first* value over
  ``warmup_steps`` steps and then plays the wrapped schedule from its step 0, i.e.
  shifted right by ``warmup_steps`` (``optax.join_schedules`` semantics).

The small ``check_*`` validators at the bottom are shared with
:mod:`metaopt.optim.optimizers`, so both kinds of spec report errors the same way.
"""

from __future__ import annotations

import bisect
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from metaopt.config import quote
from metaopt.errors import ConfigError
from metaopt.tasks.base import Schedule

__all__ = [
    "SCHEDULE_NAMES",
    "build_schedule",
    "constant",
    "cosine",
    "linear_decay",
    "piecewise_constant",
    "warmup",
]

SCHEDULE_NAMES = ("constant", "linear_decay", "cosine", "piecewise_constant")


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
# Factories
# ---------------------------------------------------------------------------


def constant(lr: float) -> Schedule:
    """The same learning rate at every step (``optax.constant_schedule``)."""
    return functools.partial(_constant_value, check_lr("lr", lr))


def linear_decay(lr: float, total_steps: int, end_lr: float = 0.0) -> Schedule:
    """Linear interpolation from ``lr`` at step 0 to ``end_lr`` at ``total_steps``, then flat.

    Same values as ``optax.linear_schedule(lr, end_lr, total_steps)``.
    """
    return functools.partial(
        _linear_value,
        check_lr("lr", lr),
        check_int("total_steps", total_steps, low=1),
        check_real("end_lr", end_lr, low=0.0),
    )


def cosine(lr: float, total_steps: int, end_lr: float = 0.0) -> Schedule:
    """Half-cosine decay from ``lr`` to ``end_lr`` over ``total_steps``, then flat.

    Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts"
    (one cycle, no restart). Same values as
    ``optax.cosine_decay_schedule(lr, total_steps, alpha=end_lr / lr)``.
    """
    return functools.partial(
        _cosine_value,
        check_lr("lr", lr),
        check_int("total_steps", total_steps, low=1),
        check_real("end_lr", end_lr, low=0.0),
    )


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
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
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
    field = "boundaries_and_lrs"
    segments = list(boundaries_and_lrs) if isinstance(boundaries_and_lrs, Iterable) else None
    if not segments:
        raise ConfigError(
            field, f"must be a non-empty list of (start_step, lr) pairs, got {quote(boundaries_and_lrs)}"
        )
    starts: list[int] = []
    lrs: list[float] = []
    for i, segment in enumerate(segments):
        if isinstance(segment, str) or not isinstance(segment, Sequence) or len(segment) != 2:
            raise ConfigError(f"{field}[{i}]", f"must be a (start_step, lr) pair, got {quote(segment)}")
        start = segment[0]
        if i == 0 and (isinstance(start, bool) or start != 0):
            problem = f"must be 0 (the first segment opens the schedule), got {quote(start)}"
            raise ConfigError(f"{field}[0].start_step", problem)
        if i > 0:
            # Strictly increasing, so the segments are sorted and none is empty.
            start = check_int(f"{field}[{i}].start_step", start, low=starts[-1] + 1)
        starts.append(int(start))
        lrs.append(check_lr(f"{field}[{i}].lr", segment[1]))
    return functools.partial(_piecewise_value, tuple(starts), tuple(lrs))


# name -> (factory, required keys, optional keys); "name" and "warmup_steps" come on top.
_SCHEDULE_SPECS: dict[str, tuple[Callable[..., Schedule], tuple[str, ...], tuple[str, ...]]] = {
    "constant": (constant, ("lr",), ()),
    "linear_decay": (linear_decay, ("lr", "total_steps"), ("end_lr",)),
    "cosine": (cosine, ("lr", "total_steps"), ("end_lr",)),
    "piecewise_constant": (piecewise_constant, ("boundaries_and_lrs",), ()),
}


def build_schedule(spec: Mapping[str, Any]) -> Schedule:
    """Build a schedule from a spec such as ``{"name": "cosine", "lr": 0.1, "total_steps": 1000}``.

    Keys are the factory's arguments plus ``name`` (one of :data:`SCHEDULE_NAMES`) and an
    optional ``warmup_steps`` (not for ``piecewise_constant``, which replays literally).
    With warm-up, ``total_steps`` is the *whole* length including the warm-up, as in
    ``optax.warmup_cosine_decay_schedule``: the decay takes ``total_steps - warmup_steps``
    steps and every step from ``total_steps`` on gets ``end_lr``. Errors name the field
    as ``schedule.<key>``.
    """
    spec = check_mapping("schedule", spec)
    name = check_choice("schedule.name", spec.get("name"), SCHEDULE_NAMES)
    factory, required, optional = _SCHEDULE_SPECS[name]
    with_warmup = name != "piecewise_constant"
    allowed = ("name", *required, *optional) + (("warmup_steps",) if with_warmup else ())
    check_keys("schedule", spec, allowed, required=required, owner=f"schedule {quote(name)}")
    kwargs = {key: spec[key] for key in (*required, *optional) if key in spec}
    try:
        warmup_steps = check_int("warmup_steps", spec.get("warmup_steps", 0), low=0)
        if warmup_steps and "total_steps" in kwargs:
            total_steps = check_int("total_steps", kwargs["total_steps"], low=1)
            # Warm-up is part of the total, so the decay must keep at least one step.
            if warmup_steps >= total_steps:
                problem = f"must be an integer in [0, total_steps) = [0, {total_steps}), got"
                raise ConfigError("warmup_steps", f"{problem} {warmup_steps}")
            kwargs["total_steps"] = total_steps - warmup_steps
        return warmup(factory(**kwargs), warmup_steps)
    except ConfigError as err:
        raise ConfigError(f"schedule.{err.field}", err.problem) from None


# ---------------------------------------------------------------------------
# Validators shared by schedule and optimizer specs. Each returns the clean value or
# raises a one-line ConfigError naming the field and the allowed values.
# ---------------------------------------------------------------------------


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_real(
    field: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite real number in the interval, else ConfigError."""
    # bool is an int subclass; ``lr: true`` in a YAML file is a typo, not 1.0.
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if is_real else math.nan
    inside = (
        math.isfinite(number)
        and (number > low if low_open else number >= low)
        and (number < high if high_open else number <= high)
    )
    if not inside:
        span = _interval(low, high, low_open or low == -math.inf, high_open or high == math.inf)
        raise ConfigError(field, f"must be a finite number in {span}, got {quote(value)}")
    return number


def check_lr(field: str, value: Any) -> float:
    """A learning rate: finite and > 0."""
    return check_real(field, value, low=0.0, low_open=True)


def check_int(field: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` if it is an integer in ``[low, high]`` (``high=None``: open), else ConfigError."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(field, f"must be an integer {span}, got {quote(value)}")
    return int(value)


def check_mapping(field: str, value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping (a dict from YAML/JSON), else ConfigError."""
    if not isinstance(value, Mapping):
        raise ConfigError(field, f"must be a mapping of settings, got {type(value).__name__}")
    return value


def check_choice(field: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else ConfigError listing them."""
    if value not in allowed:
        got = "missing" if value is None else f"got {quote(value)}"
        raise ConfigError(field, f"must be one of {', '.join(allowed)}; {got}")
    return value


def check_keys(
    prefix: str,
    spec: Mapping[str, Any],
    allowed: Sequence[str],
    required: Sequence[str] = (),
    owner: str = "",
) -> None:
    """Reject keys outside ``allowed`` and missing ``required`` keys, naming ``prefix.key``."""
    owner = f" for {owner}" if owner else ""
    for key in spec:
        if key not in allowed:
            problem = f"unknown key{owner}; allowed: {', '.join(allowed)}"
            raise ConfigError(f"{prefix}.{key}", problem)
    for key in required:
        if key not in spec:
            raise ConfigError(f"{prefix}.{key}", f"required{owner}")
