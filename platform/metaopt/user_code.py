"""The researcher's own code, named where a built-in is named: ``task: my_pkg.tasks:make_task``.

A reference is ``module:attribute`` (dotted on both sides), imported from the directory the user ran ``metaopt`` in
(:data:`USER_DIR_VARIABLE`, set for Ray's workers too, so a trial in a folder of its own still finds it; a job sent
with ``metaopt submit`` runs from its uploaded working directory, which holds the user's modules). Everything that
can go wrong is one :class:`~metaopt.errors.ConfigError` line, before Ray starts: a malformed reference, a module
that cannot be imported (or raises while imported), a missing attribute, something not callable, a signature that
does not accept the documented arguments, and (:func:`call`, :func:`expect`) a call that raises or returns the
wrong type.

Python objects (the Python API, :mod:`metaopt.api`) become references too (:func:`reference_to`): a function
importable by its module and name is named so; any other callable or object (a lambda, a function defined in a
notebook or ``__main__``, a dataset in memory) is written once with cloudpickle under ``.metaopt/objects/`` of the
user's directory and named ``pickle:<path>``. That form is accepted only from Python (validation context
``python_objects``) or inside a trial rebuilding its section, never from an experiment file or ``--set``.

Nothing here imports Ray or torch.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationInfo

from metaopt.errors import ConfigError

#: Environment variable naming the user's directory, for Ray's worker processes (see :func:`user_dir`).
USER_DIR_VARIABLE = "METAOPT_USER_DIR"
#: The prefix of a Python object written by :func:`reference_to`.
PICKLE_PREFIX = "pickle:"
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_REFERENCE = re.compile(rf"^({_DOTTED}):({_DOTTED})$")


def is_reference(value: Any) -> bool:
    """Whether ``value`` has the form of a reference (``module:attribute`` or a ``pickle:`` object)."""
    return isinstance(value, str) and (value.startswith(PICKLE_PREFIX) or _REFERENCE.match(value) is not None)


def reference_problem(value: Any) -> str | None:
    """Why ``value`` is not a well-formed ``module:attribute`` reference (None when it is)."""
    if not isinstance(value, str):
        return f"must be a 'module:function' reference, got {type(value).__name__}"
    if value.startswith(PICKLE_PREFIX) or _REFERENCE.match(value):
        return None
    return f"{_quote(value)} is not a 'module:function' reference (like my_pkg.tasks:make_task)"


def user_dir() -> Path:
    """Where references are imported from: :data:`USER_DIR_VARIABLE` when set (Ray's workers, set by
    :func:`metaopt.runtime.init`), else the current directory."""
    return Path(os.environ.get(USER_DIR_VARIABLE) or os.getcwd())


def load(reference: str, *, base: str | Path | None = None) -> Any:
    """The object a reference names, imported now (``base``, default :func:`user_dir`, first on ``sys.path``, as
    Python does for a script run from there). Any failure is one ConfigError line with no field of its own."""
    problem = reference_problem(reference)
    if problem:
        raise ConfigError("", problem)
    if reference.startswith(PICKLE_PREFIX):
        return _unpickle(reference)
    module_name, attribute = reference.split(":")
    folder = str(Path(base) if base is not None else user_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(
                "",
                f"{_quote(reference)}: no module named {_quote(err.name)} (looked in {folder} and installed packages)",
            ) from None
        raise ConfigError("", f"{_quote(reference)}: importing {module_name} failed: {_one_line(err)}") from None
    except Exception as err:  # the user's module raised while imported: their error, said in one line
        raise ConfigError("", f"{_quote(reference)}: importing {module_name} raised {_one_line(err)}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError("", f"{_quote(reference)}: {module_name} has no attribute {_quote(attribute)}")
        target = getattr(target, part)
    return target


def load_callable(reference: str, params: Sequence[str], *, base: str | Path | None = None) -> Callable[..., Any]:
    """:func:`load`, then check that the object is callable with ``params`` as positional arguments."""
    target = load(reference, base=base)
    check_signature(target, reference, params)
    return target


def check_signature(target: Any, reference: str, params: Sequence[str]) -> None:
    """One ConfigError line unless ``target(*params)`` binds (the documented arguments, by position)."""
    expected = f"({', '.join(params)})"
    if not callable(target):
        raise ConfigError("", f"{_quote(reference)} is a {type(target).__name__}, not a function taking {expected}")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # a builtin without a signature: its call will tell
    try:
        signature.bind(*params)
    except TypeError:
        raise ConfigError(
            "", f"{_quote(reference)} must accept {expected}; its signature is {_short(str(signature))}"
        ) from None


def call(target: Callable[..., Any], reference: str, *args: Any) -> Any:
    """``target(*args)``; an exception in the user's code is one ConfigError line naming the reference."""
    try:
        return target(*args)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError("", f"{_quote(reference)} raised {_one_line(err)}") from None


def expect(value: Any, reference: str, ok: bool | type | tuple[type, ...], what: str) -> Any:
    """``value`` when ``ok`` (a bool, or the type(s) it must be an instance of); else one ConfigError line."""
    good = ok if isinstance(ok, bool) else isinstance(value, ok)
    if not good:
        raise ConfigError("", f"{_quote(reference)} returned {_describe(value)}; expected {what}")
    return value


def user_function(*params: str) -> Any:
    """A section field holding a reference to a function called with ``params``: well formed always; importable,
    callable with ``params``, where the experiment runs here (``check_paths`` in the validation context: not for
    ``metaopt submit``/``list``, whose code runs on the cluster). A ``pickle:`` object only from Python.

    Use it as the field's whole type (``reward: user_function("completion", "answer")``), or ``| None`` of it;
    nested inside another ``Annotated[...]`` pydantic would not run it."""

    def check(value: Any, info: ValidationInfo) -> str:
        problem = reference_problem(value)
        if problem:
            raise ConfigError("", problem)
        context = info.context
        if value.startswith(PICKLE_PREFIX) and context is not None and not context.get("python_objects"):
            raise ConfigError("", "a pickle: reference is written by metaopt's Python API; name a 'module:function'")
        if context and context.get("check_paths"):
            load_callable(value, params, base=context.get("base"))
        return value

    return Annotated[str, AfterValidator(check)]


def reference_to(obj: Any, *, base: str | Path | None = None) -> str:
    """A reference to a Python object (the Python API): ``module:qualname`` for one importable so, else the object
    written with cloudpickle to ``<base>/.metaopt/objects/<hash>.pkl`` (``base`` default: the current directory),
    named ``pickle:<path>``. A string is taken as a reference already."""
    if isinstance(obj, str):
        return obj
    named = _importable_name(obj)
    if named is not None:
        return named
    import cloudpickle

    payload = cloudpickle.dumps(obj)
    folder = Path(base if base is not None else os.getcwd()) / ".metaopt" / "objects"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(payload).hexdigest()[:20]}.pkl"
    if not path.exists():
        path.write_bytes(payload)
    return f"{PICKLE_PREFIX}{path}"


def name_of(reference: str) -> str:
    """A short name for tables and MLflow params: the attribute's last part (``make_task``), or ``python object``."""
    if reference.startswith(PICKLE_PREFIX):
        return "python-object"
    return reference.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def _importable_name(obj: Any) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    try:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except Exception:
        return None
    return f"{module}:{qualname}" if target is obj else None


def _unpickle(reference: str) -> Any:
    path = Path(reference[len(PICKLE_PREFIX) :])
    try:
        payload = path.read_bytes()
    except OSError as err:
        raise ConfigError("", f"{_quote(reference)}: cannot read the Python object ({err.strerror})") from None
    import cloudpickle

    try:
        return cloudpickle.loads(payload)  # written by reference_to in this user's own session, never by a file
    except Exception as err:
        raise ConfigError("", f"{_quote(reference)}: cannot load the Python object: {_one_line(err)}") from None


def _describe(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {_short(text[0])}" if text else type(err).__name__


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(text: str) -> str:
    return repr(_short(text, 120))
