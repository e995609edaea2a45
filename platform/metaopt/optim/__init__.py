"""Learning-rate schedules and optimizers built from spec dicts.

:mod:`~metaopt.optim.schedules` turns specs into ``step -> lr`` functions;
:mod:`~metaopt.optim.optimizers` builds torch and optax optimizers whose learning rate an
outer loop may change between steps.
"""

from metaopt.optim.optimizers import (
    OPTIMIZER_NAMES,
    build_optax,
    build_optimizer,
    resolve_optimizer_spec,
    set_learning_rate,
    set_optax_learning_rate,
)
from metaopt.optim.schedules import (
    SCHEDULE_NAMES,
    build_schedule,
    constant,
    cosine,
    linear_decay,
    piecewise_constant,
    warmup,
)

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "build_optax",
    "build_optimizer",
    "build_schedule",
    "constant",
    "cosine",
    "linear_decay",
    "piecewise_constant",
    "resolve_optimizer_spec",
    "set_learning_rate",
    "set_optax_learning_rate",
    "warmup",
]
