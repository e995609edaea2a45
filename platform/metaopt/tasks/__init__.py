"""Learning problems shared by every capability; each meets :class:`metaopt.tasks.base.TrainingTask`.

A task is named in a section's ``task`` field in one of two ways, built the same way:

- a **registered name** (:func:`register_task`: ``digits``, ``tiny_lm``, ``cartpole_rllib``): its factory is a
  ``"module:Class"`` string imported only when a task is built (so choosing digits never imports RLlib), beside its
  options model (:mod:`metaopt.tasks.options`), the optimizer specs it trains with and the pip extra it needs;
- a **reference to the researcher's own factory** (``task: my_pkg.tasks:make_task``, :mod:`metaopt.user_code`),
  imported from the directory ``metaopt`` runs in. Its registry entry is made on the fly (:func:`task_entry`):
  options are the section's ``task_options`` mapping as given, and it trains with any :mod:`metaopt.optim`
  optimizer.

Either factory is called as ``factory(options, optimizer, seed)`` (:data:`FACTORY_PARAMETERS`) and returns a
:class:`TrainingTask`; a built-in's factory is its class. For a user's factory ``options`` is a plain ``dict``,
``optimizer`` the validated :mod:`metaopt.optim` spec (build the torch optimizer with
``metaopt.optim.build_optimizer(model.parameters(), optimizer)``, whose learning rate the outer loop then sets
before every step) and ``seed`` an int. Where the experiment runs here, the user's factory is called once while
the section is validated (:func:`check_user_task`), so a wrong return is one error line before Ray starts; the
probe also says the task's metric and mode (:func:`task_metric_mode`).

Sections name a task with :data:`TaskName` and hold its ``task_options`` / ``optimizer`` as :data:`TaskOptions` /
:data:`TaskOptimizerSpec`, which validate against the task named in the same section.
"""

from __future__ import annotations

import importlib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
)

from metaopt import user_code
from metaopt.config import StrictModel, first_error, quote
from metaopt.errors import ConfigError
from metaopt.extras import require
from metaopt.optim import OPTIMIZERS
from metaopt.tasks.base import Schedule, TrainingTask
from metaopt.tasks.options import DigitsOptions, PPOOptions, RLlibOptimizerSpec, TinyLMOptions

#: The arguments every task factory takes, by position: built-in classes and the user's functions alike.
FACTORY_PARAMETERS = ("options", "optimizer", "seed")
#: The members of :class:`TrainingTask`, as error lines list them.
CONTRACT_MEMBERS = ("metric", "mode", "divergence_loss", "step", "train", "state", "restore")
#: What a task factory must return, as said in error lines.
TASK_CONTRACT = f"an object meeting metaopt.tasks.TrainingTask ({', '.join(CONTRACT_MEMBERS)})"
#: The optimizer a symbolic proxy's user task is probed with (any metaopt.optim optimizer must do).
PROBE_OPTIMIZER = {"name": "adamw"}


@dataclass(frozen=True)
class TaskEntry:
    """One task: a registered one, or a user's factory (:func:`task_entry` makes its entry on the fly).

    ``task`` is the factory as a ``"module:attribute"`` reference, called as ``factory(options, optimizer, seed)``.
    ``optimizer`` is the model of the optimizer specs it accepts; None = any :mod:`metaopt.optim` optimizer (it
    builds its optimizer with :func:`metaopt.optim.build_optimizer`). ``extra``: the pip extra it needs.
    ``user``: the researcher's own factory, given its options as a plain dict."""

    options: type[StrictModel]
    task: str
    optimizer: type[StrictModel] | None = None
    extra: str | None = None
    user: bool = False


class UserTaskOptions(StrictModel):
    """The ``task_options`` of a user's task: any mapping, handed to the factory as a plain dict (the factory
    checks its own options; numbers must still be finite and true/false is not a number)."""

    model_config = ConfigDict(extra="allow")


_TASKS: dict[str, TaskEntry] = {}


def register_task(
    name: str,
    options: type[StrictModel],
    task: str,
    *,
    optimizer: type[StrictModel] | None = None,
    extra: str | None = None,
) -> None:
    """Make ``name`` a task choice of every section that takes one; ``task`` is its factory as ``"module:Class"``
    (the same form as a user's ``task: my_pkg.tasks:make_task``)."""
    entry = TaskEntry(options, task, optimizer, extra)
    if _TASKS.get(name, entry) != entry:
        raise ValueError(f"task {name!r} is already registered as {_TASKS[name].task}")
    _TASKS[name] = entry


def task_names(*, metaopt_optimizers: bool = False) -> tuple[str, ...]:
    """The registered names; only those that train with any :mod:`metaopt.optim` optimizer when asked."""
    return tuple(name for name, entry in _TASKS.items() if not metaopt_optimizers or entry.optimizer is None)


def is_user_task(name: Any) -> bool:
    """Whether ``name`` names the researcher's own factory (a reference, not a registered name)."""
    return isinstance(name, str) and name not in _TASKS and user_code.is_reference(name)


def task_entry(name: Any, field: str = "task") -> TaskEntry:
    """The entry of ``name`` (a user's reference gets one made now); an unknown name is a ConfigError on
    ``field`` listing the known ones."""
    if isinstance(name, str) and name in _TASKS:
        return _TASKS[name]
    if is_user_task(name):
        return TaskEntry(UserTaskOptions, name, user=True)
    raise ConfigError(field, _unknown(name, task_names()))


def _unknown(name: Any, allowed: tuple[str, ...]) -> str:
    return f"unknown task {quote(name)}; allowed: {', '.join(allowed)}, or your own 'module:function' factory"


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


def task_class(name: str) -> Any:
    """The task's factory, imported now: a registered task's class (its metric and mode are class attributes),
    or the user's function (imported from the user's directory, :func:`metaopt.user_code.load`)."""
    entry = task_entry(name)
    if entry.user:
        return user_code.load(entry.task)
    module, cls = entry.task.split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(name: str, options: Any, optimizer: Any, seed: int) -> TrainingTask:
    """Build task ``name`` with ``factory(options, optimizer, seed)`` (options and optimizer as mappings or their
    models; a user's factory gets a plain dict and the validated optimizer spec)."""
    entry = task_entry(name)
    if entry.extra is not None:
        require(entry.extra, "task")
    if entry.user:
        return build_user_task(name, options, optimizer, seed)
    return task_class(name)(options, optimizer, seed)


def build_user_task(name: str, options: Any, optimizer: Any, seed: int) -> TrainingTask:
    """The user's factory called (in the user's directory, :func:`metaopt.user_code.call`) and what it returned
    checked (:func:`checked_task`): a trial or a replay whose factory fails says so in one line on ``task``
    (an optimizer spec that is not valid is the ``optimizer``'s)."""
    arguments = user_task_arguments(name, options, optimizer, seed)
    try:
        factory = user_code.load_callable(name, FACTORY_PARAMETERS)
        task = user_code.call(factory, name, *arguments)
        checked_task(task, name)
    except ConfigError as err:
        raise ConfigError("task", err.problem if not err.field else str(err)) from None
    return task


def user_task_arguments(name: str, options: Any, optimizer: Any, seed: int) -> tuple[dict[str, Any], Any, int]:
    """What a user's factory is called with: its options as a plain dict, the validated optimizer spec, the seed."""
    if isinstance(options, BaseModel):
        options = options.model_dump()
    if not isinstance(options, Mapping):
        raise ConfigError("task_options", f"must be a mapping of options, got {type(options).__name__}")
    return dict(options), parse_task_optimizer(name, optimizer), int(seed)


# ---- the user's factory, probed once ------------------------------------------------------------------------

_PROBED: dict[tuple[str, str, str], tuple[str, str]] = {}


def task_metric_mode(name: str, options: Any = None, optimizer: Any = None, seed: int = 0) -> tuple[str, str]:
    """The score task ``name`` reports and its direction (``min``/``max``): a registered task's class
    attributes, or what the user's task says when built once with these arguments (probed at most once per
    arguments in a process: :func:`check_user_task` already did while the section was validated)."""
    if not is_user_task(name):
        task_cls = task_class(name)
        return task_cls.metric, task_cls.mode
    # the code as it is on disk now: a module edited since (a notebook) is probed again
    key = (name, user_code.fingerprint(name), _canonical([options or {}, optimizer or PROBE_OPTIMIZER, seed]))
    if key not in _PROBED:
        _PROBED[key] = _probe(name, options or {}, optimizer or PROBE_OPTIMIZER, seed)
    return _PROBED[key]


def check_user_task(name: str, options: Any, optimizer: Any, seed: int, context: Mapping[str, Any] | None) -> None:
    """For a section's after-validator: where the experiment runs here, call the user's factory once with the
    section's arguments and check what it returns (a one-line ConfigError on ``task`` otherwise). Nothing for a
    registered task, nor for an experiment that runs elsewhere (``metaopt submit``/``list``)."""
    if not is_user_task(name) or not context or not context.get("check_paths"):
        return
    try:
        task_metric_mode(name, options, optimizer, seed)
    except ConfigError as err:
        raise ConfigError("task", err.problem if not err.field else str(err)) from None


def _probe(name: str, options: Any, optimizer: Any, seed: int) -> tuple[str, str]:
    factory = user_code.load_callable(name, FACTORY_PARAMETERS)
    task = user_code.call(factory, name, *user_task_arguments(name, options, optimizer, seed))
    try:
        return checked_task(task, name)
    finally:
        close = getattr(task, "close", None)
        if callable(close):
            user_code.call(close, f"{name} (its close())")


def checked_task(task: Any, reference: str) -> tuple[str, str]:
    """``(metric, mode)`` of what a user's factory returned, when it meets :class:`TrainingTask`; else one
    ConfigError line naming the reference and what is missing."""
    missing = [member for member in CONTRACT_MEMBERS if not hasattr(task, member)]
    partly = 0 < len(missing) < len(CONTRACT_MEMBERS)
    what = f"{TASK_CONTRACT}; it lacks {', '.join(missing)}" if partly else TASK_CONTRACT
    user_code.expect(task, reference, isinstance(task, TrainingTask), what)
    metric, mode = task.metric, task.mode
    if not isinstance(metric, str) or not metric:
        raise ConfigError("", f"{quote(reference)} returned a task whose metric is {quote(metric)}; expected a name")
    if mode not in ("min", "max"):
        raise ConfigError("", f"{quote(reference)} returned a task whose mode is {quote(mode)}; expected min or max")
    return metric, mode


def _canonical(value: Any) -> str:
    """A stable text of options/optimizer/seed (models as their JSON dump), to remember a probe by."""

    def plain(item: Any) -> Any:
        return item.model_dump(mode="json") if isinstance(item, BaseModel) else repr(item)

    return json.dumps(value, sort_keys=True, default=plain)


# ---- section fields -----------------------------------------------------------------------------------------


def _user_factory_check() -> Any:
    """The checks of a ``module:function`` field (:func:`metaopt.user_code.user_function`) for a task factory:
    well formed always; importable and callable with :data:`FACTORY_PARAMETERS` where the experiment runs here."""
    _, validator = typing.get_args(user_code.user_function(*FACTORY_PARAMETERS))
    return validator.func


_check_user_factory = _user_factory_check()


def _names_a_factory(name: str) -> bool:
    """A name with a colon is meant as a reference (a malformed one is reported as such)."""
    return name not in _TASKS and ":" in name


def _known_task(name: str, info: ValidationInfo) -> str:
    if _names_a_factory(name):
        return _check_user_factory(name, info)
    entry = task_entry(name, field="")
    if entry.extra is not None:
        # the field is the task name itself; only where the experiment runs (not for metaopt submit / list)
        require(entry.extra, "", info.context)
    return name


def _trains_with_metaopt_optimizers(name: str, info: ValidationInfo) -> str:
    allowed = task_names(metaopt_optimizers=True)
    if name in _TASKS and name not in allowed:
        raise ConfigError(
            "",
            f"task {quote(name)} trains with its own optimizer, not a metaopt.optim one; allowed: "
            f"{', '.join(allowed)}, or your own 'module:function' factory",
        )
    if name not in _TASKS and not _names_a_factory(name):
        raise ConfigError("", _unknown(name, allowed))
    return _known_task(name, info)  # a user's task trains with any metaopt.optim optimizer


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


#: A section's ``task`` field: a registered task (whose extra is installed, where the experiment runs here), or a
#: reference to the user's factory ``module:function(options, optimizer, seed)`` (imported and its signature
#: checked where the experiment runs here; give the section an after-validator calling :func:`check_user_task`).
TaskName = Annotated[str, AfterValidator(_known_task)]
#: A ``task`` field of a section that trains it with metaopt.optim optimizers of its own choosing (program search):
#: a registered task that does, or the user's factory (which builds any metaopt.optim optimizer it is given).
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
    "CONTRACT_MEMBERS",
    "FACTORY_PARAMETERS",
    "PROBE_OPTIMIZER",
    "MetaoptOptimizerTaskName",
    "Schedule",
    "TaskEntry",
    "TaskName",
    "TaskOptimizerSpec",
    "TaskOptions",
    "TrainingTask",
    "UserTaskOptions",
    "build_task",
    "build_user_task",
    "check_user_task",
    "checked_task",
    "is_user_task",
    "parse_task_optimizer",
    "parse_task_options",
    "register_task",
    "task_class",
    "task_entry",
    "task_metric_mode",
    "task_names",
]
