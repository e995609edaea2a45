"""The table of capabilities: which experiment kinds exist, how each is validated and run, which verbs it adds.

A capability (``pbt``, ``federated``, ...) is a folder that ends its ``config.py`` with one
:class:`Capability`: its kind, its section model, its runner and, if it has any, extra CLI verbs and the pip
extra it needs. The platform finds capabilities in three ways:

- :data:`BUILT_IN`, the table of the capabilities that ship with metaopt (one line each), kept in the package so
  it travels with the code Ray ships to a cluster; neither :mod:`metaopt.config` nor :mod:`metaopt.cli` names
  a capability;
- the entry-point group ``metaopt.capabilities`` (``mykind = "mypackage.config:CAPABILITY"`` in a plugin
  package's ``pyproject.toml``): how an installed plugin adds its kinds;
- :func:`register` for Python code and tests.

An entry point is loaded only when its kind is asked for (or when the CLI lists every verb), and a capability's
runner and verb handlers are ``"module:function"`` strings imported only when they run: loading an experiment
file never imports Ray, torch or JAX. A kind defined twice is an error, never a silent override.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from metaopt.errors import ConfigError

ENTRY_POINT_GROUP = "metaopt.capabilities"

#: The capabilities that ship with metaopt: kind -> ``"module:attribute"`` of its :class:`Capability`. Kept in
#: the package (not in its installed metadata), so a job whose code Ray ships to a cluster without metaopt
#: installed (``py_modules``) finds them; plugin packages add theirs through the entry-point group.
BUILT_IN: dict[str, str] = {
    "federated": "metaopt.federated.config:CAPABILITY",
    "lpo": "metaopt.objectives.config:CAPABILITY",
    "lpo_eval": "metaopt.objectives.config:EVAL_CAPABILITY",
    "pbt": "metaopt.pbt.config:CAPABILITY",
    "posttrain": "metaopt.posttrain.config:CAPABILITY",
    "symbolic": "metaopt.symbolic.config:CAPABILITY",
}
KIND_PATTERN = r"[a-z][a-z0-9_]*"  # a kind is also the name of its section in the file: a plain YAML key
VERB_PATTERN = r"[a-z][a-z0-9-]*"  # a CLI verb as typed on the command line
TARGET_PATTERN = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"  # "package.module:function"


def import_target(target: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` string names, imported now (and only now)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Command:
    """An extra CLI verb of a capability (``metaopt replay ...`` for pbt).

    ``add_arguments`` declares its arguments on the verb's argparse parser (cheap: it runs for every
    ``metaopt`` invocation); ``handler`` names the function ``handler(args) -> exit status`` that runs the verb,
    imported only when the verb is used. A :class:`~metaopt.errors.ConfigError` it raises is printed as the one
    error line and exits 2, like every other verb's."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: str

    def __post_init__(self) -> None:
        if not re.fullmatch(VERB_PATTERN, self.name):
            raise ValueError(f"command name must match {VERB_PATTERN} (got {self.name!r})")
        if not re.fullmatch(TARGET_PATTERN, self.handler):
            raise ValueError(f"command {self.name!r}: handler must be 'module:function' (got {self.handler!r})")

    def run(self, args: argparse.Namespace) -> int:
        return import_target(self.handler)(args)


@dataclass(frozen=True)
class Capability:
    """One experiment kind: what its section holds, what runs it, what else it adds to the CLI, what it needs.

    ``section`` validates the file's block named after ``kind`` (a :class:`~metaopt.config.StrictModel`
    subclass in practice: unknown keys are errors); ``runner`` names ``run(experiment, address, verbose)``;
    ``extra`` names the pip extra of ``metaopt-platform`` the kind needs (:mod:`metaopt.extras`), or None;
    ``provides`` names ``"module:function"`` hooks that fill a lower layer's registry with what the capability
    offers beyond its kind (symbolic: its ``program`` optimizer into :mod:`metaopt.optim`), run once by
    :func:`load_providers` when that registry is first read."""

    kind: str
    section: type[BaseModel]
    runner: str
    commands: tuple[Command, ...] = field(default=())
    extra: str | None = None
    provides: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not re.fullmatch(KIND_PATTERN, self.kind):
            raise ValueError(f"kind must match {KIND_PATTERN} (got {self.kind!r})")
        if not (isinstance(self.section, type) and issubclass(self.section, BaseModel)):
            raise ValueError(f"kind {self.kind!r}: section must be a pydantic model class (got {self.section!r})")
        if not re.fullmatch(TARGET_PATTERN, self.runner):
            raise ValueError(f"kind {self.kind!r}: runner must be 'module:function' (got {self.runner!r})")
        object.__setattr__(self, "commands", tuple(self.commands))
        object.__setattr__(self, "provides", tuple(self.provides))
        for target in self.provides:
            if not re.fullmatch(TARGET_PATTERN, target):
                raise ValueError(f"kind {self.kind!r}: provides must be 'module:function' strings (got {target!r})")
        names = [command.name for command in self.commands]
        if len(set(names)) != len(names):
            raise ValueError(f"kind {self.kind!r}: command names repeat: {names}")

    def load_runner(self) -> Callable[..., Any]:
        """The run function, imported now: the first moment Ray, torch or JAX may be imported."""
        return import_target(self.runner)


_registered: dict[str, Capability] = {}  # by register(): Python code and tests
_loaded: dict[str, Capability] = {}  # entry points loaded so far (each is loaded once per process)


def register(capability: Capability) -> Capability:
    """Add a kind from Python code (a test, a notebook); a kind that already exists is a ValueError."""
    if not isinstance(capability, Capability):
        raise TypeError(f"register() takes a Capability, got {type(capability).__name__}")
    if capability.kind in _registered or capability.kind in _entry_points():
        raise ValueError(f"kind {capability.kind!r} is already registered; kinds must be unique")
    _registered[capability.kind] = capability
    return capability


def unregister(kind: str) -> None:
    """Remove a kind added by :func:`register` (tests clean up after themselves); unknown kinds are ignored."""
    _registered.pop(kind, None)


def kinds() -> list[str]:
    """Every kind, sorted, without loading any capability: what an error line lists as allowed."""
    return sorted({*_registered, *_entry_points()})


def get(kind: str) -> Capability:
    """The capability of ``kind`` (one of :func:`kinds`), its entry point loaded on first use."""
    if kind in _registered:
        return _registered[kind]
    if kind not in _loaded:
        points = _entry_points()
        if kind not in points:
            raise KeyError(f"no capability of kind {kind!r}; kinds: {', '.join(kinds())}")
        _loaded[kind] = _load(points[kind])
    return _loaded[kind]


def load_providers() -> list[ConfigError]:
    """Run every capability's ``provides`` hooks (once per process is the caller's business). A capability that
    cannot be loaded (a broken plugin) provides nothing and is returned with the reason, after one warning line:
    the others still provide theirs, and using the broken kind still names the problem."""
    failures = []
    for kind in kinds():
        try:
            capability = get(kind)
        except ConfigError as err:
            print(f"[metaopt] warning: {err}", file=sys.stderr)
            failures.append(err)
            continue
        for target in capability.provides:
            import_target(target)()
    return failures


@functools.cache  # the installed packages do not change while we run; reading their metadata costs milliseconds
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The built-in kinds and the entry points of the group, by kind. Two different ones for a kind (a plugin
    claiming a built-in kind, two installed packages claiming one) is one ConfigError line naming both; the same
    one seen twice (a stale install's metadata repeating a built-in) is one."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    built_in = [importlib.metadata.EntryPoint(kind, target, ENTRY_POINT_GROUP) for kind, target in BUILT_IN.items()]
    for point in [*built_in, *importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]:
        seen = found.setdefault(point.name, point)
        if seen.value != point.value:
            raise ConfigError(
                "kind",
                f"{point.name!r} is defined twice, by {seen.value} and {point.value}; "
                "uninstall one of the packages that define it",
            )
    return found


def _load(point: importlib.metadata.EntryPoint) -> Capability:
    """The Capability an entry point names, checked to be one and to be the kind it is registered as."""
    where = f"entry point {point.name} = {point.value}"
    try:
        capability = point.load()
    except Exception as err:  # a plugin's module may fail in any way; the CLI still prints one line
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            "kind",
            f"capability {point.name!r} cannot be loaded ({where}): "
            f"{type(err).__name__}{': ' if reason else ''}{reason}",
        ) from err
    if not isinstance(capability, Capability):
        raise ConfigError("kind", f"{where} names a {type(capability).__name__}, not a metaopt Capability")
    if capability.kind != point.name:
        raise ConfigError("kind", f"{where} names the capability of kind {capability.kind!r}, not {point.name!r}")
    return capability
