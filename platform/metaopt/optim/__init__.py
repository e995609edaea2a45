"""Learning-rate schedules and optimizers built from validated specs.

:mod:`~metaopt.optim.schedules` turns schedule specs into ``step -> lr`` functions (:data:`Schedule`);
:mod:`~metaopt.optim.optimizers` builds torch and optax optimizers whose learning rate an outer loop may change
between steps, and holds the optimizer registry other packages add to (:func:`register_optimizer`). Specs are
pydantic models chosen by ``name`` (:data:`OptimizerSpec`, :data:`ScheduleSpec` as config field types).

Importing this package imports neither torch nor jax, and no capability or task: it sits below them.
"""

from metaopt.optim.optimizers import (
    OPTIMIZERS,
    OptimizerSpec,
    OptimizerSpecModel,
    build_optax,
    build_optimizer,
    load_optimizer_providers,
    optimizer_names,
    register_optimizer,
    resolve_optimizer_spec,
    set_learning_rate,
    set_optax_learning_rate,
)
from metaopt.optim.schedules import (
    SCHEDULE_NAMES,
    SCHEDULES,
    OptionalScheduleSpec,
    Schedule,
    ScheduleSpec,
    build_schedule,
    constant,
    cosine,
    linear_decay,
    piecewise_constant,
    warmup,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "SCHEDULE_NAMES",
    "OptimizerSpec",
    "OptimizerSpecModel",
    "OptionalScheduleSpec",
    "Schedule",
    "ScheduleSpec",
    "build_optax",
    "build_optimizer",
    "build_schedule",
    "constant",
    "cosine",
    "linear_decay",
    "load_optimizer_providers",
    "optimizer_names",
    "piecewise_constant",
    "register_optimizer",
    "resolve_optimizer_spec",
    "set_learning_rate",
    "set_optax_learning_rate",
    "warmup",
]
