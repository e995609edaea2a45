"""The researcher's own code, named where a built-in is named: ``task: my_pkg.tasks:make_task``.

A reference is ``module:attribute`` (dotted on both sides), imported from the directory the user ran ``metaopt`` in
(:data:`USER_DIR_VARIABLE`, set for Ray's workers too, so a trial in a folder of its own still finds it; a job sent
with ``metaopt submit`` runs from its uploaded working directory, which holds the user's modules). Everything that
can go wrong is one :class:`~metaopt.errors.ConfigError` line, before Ray starts: a malformed reference, a module
that cannot be imported (or raises while imported), a missing attribute, something not callable, a signature that
does not accept the documented arguments, and (:func:`call`, :func:`expect`) a call that raises or returns the
wrong type.

The user's functions run with the current directory set to the user's directory (:func:`call`,
:func:`in_user_dir`): Ray starts each trial in a folder of its own, and a factory that reads ``open("data.csv")``
must read the file beside the experiment, in the driver's check and in every trial alike. That holds while the
function runs; what it returns (a task's ``train``) runs later in the trial's folder, so it should read files by
absolute path (``Path(__file__).parent / "data.csv"``) or read them in the factory.

A module is imported once and imported again (:func:`importlib.reload`) when its file changed or the user's
directory did (a notebook that edits its module, or moves to another project, gets the code on disk now).

Python objects (the Python API, :mod:`metaopt.api`) become references too (:func:`reference_to`): a function
importable by its module and name, from the user's directory or an installed location, is named so; any other
callable or object (a lambda, a function defined in a notebook or ``__main__``, one of a module found only through
the notebook's own ``sys.path``, a dataset in memory) is written once with cloudpickle (by value) under
:data:`OBJECTS_FOLDER` of the user's directory and named ``pickle:<path>``. That form is accepted only from Python
(validation context ``python_objects``) or inside a trial rebuilding its section, never from an experiment file or
``--set``.

Nothing here imports Ray or torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import os
import re
import site
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationInfo

from metaopt.errors import ConfigError

#: Environment variable naming the user's directory, for Ray's worker processes (see :func:`user_dir`).
USER_DIR_VARIABLE = "METAOPT_USER_DIR"
#: Set by Ray Tune in a trial's process: the directory the worker started in, before Tune moved it into the trial's
#: folder (a job's or ``--address`` run's uploaded working directory, which holds the user's modules).
TUNE_START_DIR_VARIABLE = "TUNE_ORIG_WORKING_DIR"
#: The prefix of a Python object written by :func:`reference_to`.
PICKLE_PREFIX = "pickle:"
#: Where the Python API writes the objects it names (pickles, arrays), relative to the user's directory; local by
#: nature (``metaopt submit`` does not upload it).
OBJECTS_FOLDER = Path(".metaopt") / "objects"
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
    """Where references are imported from and the user's functions run: :data:`USER_DIR_VARIABLE` when set (Ray's
    workers, set by :func:`metaopt.runtime.init`), else the directory a Tune trial started in
    (:data:`TUNE_START_DIR_VARIABLE`: a submitted job's working directory), else the current directory."""
    return Path(os.environ.get(USER_DIR_VARIABLE) or os.environ.get(TUNE_START_DIR_VARIABLE) or os.getcwd())


@contextlib.contextmanager
def in_user_dir() -> Iterator[Path]:
    """The current directory is :func:`user_dir` inside the block (relative paths the user's code opens are read
    against the folder the user ran metaopt in), the previous one again afterwards. The current directory belongs
    to the whole process: the user's functions are called from one thread at a time."""
    folder, previous = user_dir(), os.getcwd()
    if not folder.is_dir():
        yield folder
        return
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def from_dir(folder: str | Path) -> Iterator[None]:
    """References are imported from ``folder``, and the user's functions run there, inside the block (replaying a
    sweep from the directory it ran in)."""
    previous = os.environ.get(USER_DIR_VARIABLE)
    os.environ[USER_DIR_VARIABLE] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(USER_DIR_VARIABLE, None)
        else:
            os.environ[USER_DIR_VARIABLE] = previous


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
    _put_first_on_path(folder)
    try:
        with _stderr_kept() as printed:
            module = _fresh_module(module_name, folder)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(
                "",
                f"{_quote(reference)}: no module named {_quote(err.name)} (looked in {folder} and installed packages)",
            ) from None
        raise ConfigError("", f"{_quote(reference)}: importing {module_name} failed: {_one_line(err)}") from None
    except SystemExit as err:  # argparse or sys.exit at import: the module is a script, not a library
        said = _last_line(printed.getvalue())
        raise ConfigError(
            "",
            f"{_quote(reference)}: importing {module_name} exited ({_exit_text(err)}{'; ' + said if said else ''}); "
            "a module named here must not parse the command line or exit when imported "
            "(put that under if __name__ == '__main__':)",
        ) from None
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
    """``target(*args)`` run in the user's directory (:func:`in_user_dir`); an exception in the user's code, or
    its ``sys.exit``, is one ConfigError line naming the reference."""
    try:
        with in_user_dir():
            return target(*args)
    except ConfigError:
        raise
    except SystemExit as err:
        raise ConfigError("", f"{_quote(reference)} exited ({_exit_text(err)}); raise an exception instead") from None
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
    """A reference to a Python object (the Python API): ``module:qualname`` for one Ray's workers can import so
    (its module lies in the user's directory ``base``, default :func:`user_dir`, or in an installed location),
    else the object written with cloudpickle, by value, to ``<base>/.metaopt/objects/<hash>.pkl`` and named
    ``pickle:<path>``. A string is taken as a reference already."""
    if isinstance(obj, str):
        return obj
    folder = Path(base) if base is not None else user_dir()
    named = _importable_name(obj, folder)
    if named is not None:
        return named
    payload = _pickled_by_value(obj, folder)
    path = write_once(objects_folder(folder) / f"{hashlib.sha256(payload).hexdigest()[:20]}.pkl", payload)
    return f"{PICKLE_PREFIX}{path}"


def objects_folder(base: str | Path | None = None) -> Path:
    """:data:`OBJECTS_FOLDER` of ``base`` (default: the current directory)."""
    return Path(base if base is not None else os.getcwd()) / OBJECTS_FOLDER


def write_once(path: Path, payload: bytes) -> Path:
    """``payload`` written to ``path`` unless it exists (a name made from the payload's hash: the same content),
    atomically: a temporary file in the same folder, then :func:`os.replace`, so a reader (or a second writer)
    sees the whole file or none."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return path


def module_file(reference: str) -> Path | None:
    """The source file of the module a ``module:attribute`` reference names (imported now), None for a ``pickle:``
    object or a module without a file."""
    if reference.startswith(PICKLE_PREFIX):
        return None
    load(reference)
    file = getattr(sys.modules.get(reference.split(":")[0]), "__file__", None)
    return Path(file) if file else None


def code_record(reference: str) -> dict[str, str]:
    """What pins the code a reference names, for a sweep's record (replay, MLflow params): the user's directory,
    the module's file and its sha256. Empty for a ``pickle:`` object or a module without a file."""
    file = module_file(reference)
    if file is None:
        return {}
    return {"user_dir": str(user_dir()), "module_file": str(file), "sha256": file_sha256(file)}


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(reference: str) -> str:
    """Which code a reference names now: its module's file, size and modification time (a ``pickle:`` object:
    its path, which is its content's hash). Changes when the file is edited or another directory's is used."""
    file = module_file(reference)
    if file is None:
        return reference
    stamp = _stamp_of(str(file))
    return f"{file}:{stamp}"


def name_of(reference: str) -> str:
    """A short name for tables and MLflow params: the attribute's last part (``make_task``), or ``python object``."""
    if reference.startswith(PICKLE_PREFIX):
        return "python-object"
    return reference.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def _importable_name(obj: Any, folder: Path) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    if not _reachable(sys.modules.get(module), folder):
        return None
    try:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except Exception:
        return None
    return f"{module}:{qualname}" if target is obj else None


def _reachable(module: Any, folder: Path) -> bool:
    """Whether Ray's workers import ``module`` by its name: a module without a file (builtins) or one whose file
    lies under the user's directory or an installed location (the standard library, site-packages, metaopt)."""
    if module is None:
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return module.__name__ in sys.builtin_module_names
    path = os.path.realpath(file)
    return any(path.startswith(root + os.sep) for root in (os.path.realpath(folder), *_installed_roots()))


def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    roots.add(str(Path(__file__).resolve().parent))  # metaopt itself (an editable install lives elsewhere)
    return tuple(os.path.realpath(root) for root in roots if root)


def _pickled_by_value(obj: Any, folder: Path) -> bytes:
    """``obj`` with cloudpickle, its own module (and its class's) pickled by value when Ray's workers could not
    import it by name (a module the notebook found through its own ``sys.path``); the registration is undone
    afterwards, and one the user made is left alone."""
    import cloudpickle

    already = set(cloudpickle.list_registry_pickle_by_value())
    registered = []
    for name in {getattr(obj, "__module__", None), type(obj).__module__}:
        if not isinstance(name, str):
            continue
        top = name.split(".")[0]
        module = sys.modules.get(top)
        if module is None or top in already or top == "__main__" or _reachable(sys.modules.get(name), folder):
            continue
        with contextlib.suppress(ValueError, TypeError):
            cloudpickle.register_pickle_by_value(module)
            registered.append(module)
    try:
        return cloudpickle.dumps(obj)
    finally:
        for module in registered:
            cloudpickle.unregister_pickle_by_value(module)


# ---- importing the user's modules, fresh --------------------------------------------------------------------

#: module name -> (the user's directory it was imported for, its file's stamp then); only modules load imported.
_LOADED: dict[str, tuple[str, tuple[int, int] | None]] = {}
#: The user's directories :func:`load` put on sys.path (the latest first); a previous one leaves when another comes.
_ON_PATH: list[str] = []


def _put_first_on_path(folder: str) -> None:
    for previous in [entry for entry in _ON_PATH if entry != folder]:
        _ON_PATH.remove(previous)
        with contextlib.suppress(ValueError):
            sys.path.remove(previous)
    if folder not in sys.path:
        sys.path.insert(0, folder)
        if folder not in _ON_PATH:
            _ON_PATH.append(folder)


def _fresh_module(name: str, folder: str) -> Any:
    """The module ``name``: imported now, or the one imported before unless its file changed since, or it came
    from another user's directory than ``folder`` (then imported again, :func:`importlib.reload`)."""
    module = sys.modules.get(name)
    if module is None:
        importlib.invalidate_caches()  # a file written a moment ago (a notebook cell) is found
        module = importlib.import_module(name)
    elif _stale(name, module, folder):
        importlib.invalidate_caches()
        module = importlib.reload(module)
    _LOADED[name] = (folder, _stamp_of(getattr(module, "__file__", None)))
    return module


def _stale(name: str, module: Any, folder: str) -> bool:
    seen = _LOADED.get(name)
    if seen is None:  # imported by the user's own code first: theirs to reload
        return False
    seen_folder, seen_stamp = seen
    file = getattr(module, "__file__", None)
    if _stamp_of(file) != seen_stamp:
        return True
    moved = seen_folder != folder
    return moved and file is not None and os.path.realpath(file).startswith(os.path.realpath(seen_folder) + os.sep)


def _stamp_of(file: str | None) -> tuple[int, int] | None:
    if not file:
        return None
    try:
        status = os.stat(file)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


@contextlib.contextmanager
def _stderr_kept() -> Iterator[io.StringIO]:
    """What the module prints to stderr while imported is kept (argparse's usage before it exits belongs in the
    one error line) and written out afterwards when the import did not exit."""
    printed = io.StringIO()
    exited = False
    try:
        with contextlib.redirect_stderr(printed):
            yield printed
    except SystemExit:
        exited = True
        raise
    finally:
        if not exited and printed.getvalue():
            sys.stderr.write(printed.getvalue())


def _exit_text(err: SystemExit) -> str:
    code = err.code
    return f"sys.exit({code!r})" if not isinstance(code, str) else f"sys.exit: {_short(code.strip(), 120)}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return _short(lines[-1], 120) if lines else ""


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
