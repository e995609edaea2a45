"""Learning problems shared by every capability; each meets :class:`metaopt.tasks.base.TrainingTask`.

The task registry (:func:`register_task`) is the one list of task names: each name has its options model
(:mod:`metaopt.tasks.options`), its class as a ``"module:Class"`` string imported only when a task is built (so
choosing digits never imports RLlib), the optimizer specs it trains with, and the pip extra it needs. Sections
name a task with :data:`TaskName` and hold its ``task_options`` / ``optimizer`` as :data:`TaskOptions` /
:data:`TaskOptimizerSpec`, which validate against the task named in the same section.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, SerializeAsAny, ValidationError, ValidationInfo

from metaopt.config import StrictModel, first_error, quote
from metaopt.errors import ConfigError
from metaopt.extras import require
from metaopt.optim import OPTIMIZERS
from metaopt.tasks.base import Schedule, TrainingTask
from metaopt.tasks.options import DigitsOptions, PPOOptions, RLlibOptimizerSpec, TinyLMOptions


@dataclass(frozen=True)
class TaskEntry:
    """One registered task.

    ``optimizer`` is the model of the optimizer specs it accepts; None = any :mod:`metaopt.optim` optimizer (it
    builds its optimizer with :func:`metaopt.optim.build_optimizer`). ``extra``: the pip extra it needs."""

    options: type[StrictModel]
    task: str
    optimizer: type[StrictModel] | None = None
    extra: str | None = None


_TASKS: dict[str, TaskEntry] = {}


def register_task(
    name: str,
    options: type[StrictModel],
    task: str,
    *,
    optimizer: type[StrictModel] | None = None,
    extra: str | None = None,
) -> None:
    """Make ``name`` a task choice of every section that takes one; ``task`` is ``"module:Class"``."""
    entry = TaskEntry(options, task, optimizer, extra)
    if _TASKS.get(name, entry) != entry:
        raise ValueError(f"task {name!r} is already registered as {_TASKS[name].task}")
    _TASKS[name] = entry


def task_names(*, metaopt_optimizers: bool = False) -> tuple[str, ...]:
    """The registered names; only those that train with any :mod:`metaopt.optim` optimizer when asked."""
    return tuple(name for name, entry in _TASKS.items() if not metaopt_optimizers or entry.optimizer is None)


def task_entry(name: Any, field: str = "task") -> TaskEntry:
    """The entry of ``name``; an unknown name is a ConfigError on ``field`` listing the known ones."""
    if isinstance(name, str) and name in _TASKS:
        return _TASKS[name]
    raise ConfigError(field, f"unknown task {quote(name)}; allowed: {', '.join(task_names())}")


def parse_task_options(
    name: str, options: Any, field: str = "task_options", context: dict[str, Any] | None = None
) -> StrictModel:
    """``options`` (a mapping, or the task's options model) validated by the task's model; errors name
    ``<field>.<option>``. ``context``: pydantic's validation context of the section (:func:`metaopt.config.from_dict`:
    where relative paths are read from, whether the experiment runs here)."""
    return _validated(task_entry(name).options, options, field, context, f"a mapping of {name} options")


def parse_task_optimizer(
    name: str, spec: Any, field: str = "optimizer", context: dict[str, Any] | None = None
) -> StrictModel:
    """The optimizer spec a task ``name`` trains with, validated; errors name ``<field>.<key>``. ``context``: as
    for :func:`parse_task_options` (a program file is read from the context's ``base``)."""
    model = task_entry(name).optimizer
    if model is None:
        return OPTIMIZERS.parse(spec, field, context)
    return _validated(model, spec, field, context, "a mapping like {'name': ...}")


def _validated(
    model: type[StrictModel], value: Any, field: str, context: dict[str, Any] | None, expected: str
) -> StrictModel:
    """``value`` as ``model`` (an instance already is one); errors are one line on ``field``."""
    if isinstance(value, model):
        return value
    if not isinstance(value, dict):
        raise ConfigError(field, f"must be {expected}, got {type(value).__name__}")
    try:
        return model.model_validate(value, context=context)
    except ValidationError as err:
        raise first_error(field, model, err) from None


def task_class(name: str) -> type[Any]:
    """The task's class, imported now (its metric and mode are class attributes)."""
    module, cls = task_entry(name).task.split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(name: str, options: Any, optimizer: Any, seed: int) -> TrainingTask:
    """Instantiate a registered task (options and optimizer as mappings or their models)."""
    entry = task_entry(name)
    if entry.extra is not None:
        require(entry.extra, "task")
    return task_class(name)(options, optimizer, seed)


# ---- section fields -----------------------------------------------------------------------------------------


def _known_task(name: str, info: ValidationInfo) -> str:
    entry = task_entry(name, field="")
    if entry.extra is not None:
        # the field is the task name itself; only where the experiment runs (not for metaopt submit / list)
        require(entry.extra, "", info.context)
    return name


def _trains_with_metaopt_optimizers(name: str, info: ValidationInfo) -> str:
    allowed = task_names(metaopt_optimizers=True)
    if name not in allowed:
        problem = (
            f"task {quote(name)} trains with its own optimizer, not a metaopt.optim one"
            if name in _TASKS
            else f"unknown task {quote(name)}"
        )
        raise ConfigError("", f"{problem}; allowed: {', '.join(allowed)}")
    return _known_task(name, info)


def _sibling_task(info: ValidationInfo) -> str | None:
    # pydantic validates fields in order: the section's ``task`` (declared first) is in info.data when valid.
    return info.data.get("task")


def _options_of_task(options: Any, info: ValidationInfo) -> Any:
    task = _sibling_task(info)
    if task is None:
        return options
    return parse_task_options(task, {} if options is None else options, field="", context=info.context)


def _optimizer_of_task(spec: Any, info: ValidationInfo) -> Any:
    task = _sibling_task(info)
    return spec if task is None else parse_task_optimizer(task, spec, field="", context=info.context)


#: A section's ``task`` field: a registered task (whose extra is installed, where the experiment runs here).
TaskName = Annotated[str, AfterValidator(_known_task)]
#: A ``task`` field of a section that trains it with metaopt.optim optimizers of its own choosing (program search).
MetaoptOptimizerTaskName = Annotated[str, AfterValidator(_trains_with_metaopt_optimizers)]
#: ``task_options`` of the section's ``task`` (declare ``task`` before it; give the field
#: ``default_factory=dict, validate_default=True`` so the task's defaults are filled in).
TaskOptions = Annotated[SerializeAsAny[StrictModel], BeforeValidator(_options_of_task)]
#: ``optimizer`` of the section's ``task``: a metaopt.optim spec, or the task's own (RLlib's Adam).
TaskOptimizerSpec = Annotated[SerializeAsAny[StrictModel], BeforeValidator(_optimizer_of_task)]


register_task("digits", DigitsOptions, "metaopt.tasks.digits:DigitsTask")
register_task(
    "cartpole_rllib", PPOOptions, "metaopt.tasks.rllib_ppo:RLlibPPOTask", optimizer=RLlibOptimizerSpec, extra="rllib"
)
register_task("tiny_lm", TinyLMOptions, "metaopt.tasks.tiny_lm:TinyLMTask")

__all__ = [
    "MetaoptOptimizerTaskName",
    "Schedule",
    "TaskEntry",
    "TaskName",
    "TaskOptimizerSpec",
    "TaskOptions",
    "TrainingTask",
    "build_task",
    "parse_task_optimizer",
    "parse_task_options",
    "register_task",
    "task_class",
    "task_entry",
    "task_names",
]
