"""Typed experiment files: YAML in, one validated :class:`Experiment` out, or one clear error line.

An experiment file has a fixed top level (``name``, ``kind``, ``description``, ``ray``, ``tracking``) and one
section named after its ``kind`` holding that capability's typed config (e.g. ``pbt:``). ``--set a.b=v``
overrides are applied to the raw mapping before validation, so they are checked exactly like the file.
Every problem becomes a :class:`~metaopt.errors.ConfigError` whose text names the field (``pbt.population``)
and what is allowed; the CLI prints it and exits 2.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import stat
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator

from metaopt import extras, registry
from metaopt.errors import ConfigError
from metaopt.redact import redact_text

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # used with re.fullmatch: ``$`` would let a trailing newline in
NAME_MAX = 100  # experiment and MLflow experiment names: they become run names, folder names and table cells
MAX_FILE_BYTES = 1 << 20  # experiment files, program files, schedules.json: what we read, at most
MAX_YAML_DEPTH = 64  # nesting of YAML collections; real files use < 10, PyYAML's composer recurses per level
MAX_YAML_NODES = 100_000  # values in a YAML document with every alias expanded (a "billion laughs" has 10^9)
SEED_LIMIT = 2**32  # numpy, JAX (uint32 keys) and Tune all take seeds in [0, 2**32)

#: A seed: what numpy's, torch's and JAX's generators all accept.
Seed = Annotated[int, Strict(), Field(ge=0, lt=SEED_LIMIT)]  # strict: 3.0 or "3" is a mistake, as in task options

_QUOTE = reprlib.Repr()
_QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlist, _QUOTE.maxtuple, _QUOTE.maxdict, _QUOTE.maxlevel = 60, 60, 8, 8, 6, 3


_QUOTE_PATH = reprlib.Repr()
_QUOTE_PATH.maxstring = 240


def quote(value: Any) -> str:
    """``repr`` of user input, shortened (``'aaaa...aaa'``): an error line quotes what was written, never all of it."""
    return _QUOTE.repr(redact_text(value) if isinstance(value, str) else value)  # never a URI's password


def quote_path(path: str | Path) -> str:
    """A path quoted in an error line: whole up to a few lines' length (most are), shortened beyond."""
    return _QUOTE_PATH.repr(str(path))


def read_text_capped(path: str | Path, field: str, what: str = "file") -> str:
    """The UTF-8 text of a regular file of at most :data:`MAX_FILE_BYTES`, or one ConfigError on ``field``.

    A FIFO would block forever and ``/dev/zero`` never ends, so only regular files are opened, and no more than
    the cap (plus one byte, to tell a larger file) is ever read."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(field, "file not found") from None
    except OSError as err:
        raise ConfigError(field, f"cannot read {what}: {err.strerror or type(err).__name__}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(field, f"is a directory, expected {_a(what)}")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(field, f"not a regular file (a device, FIFO or socket), expected {_a(what)}")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(field, f"cannot read {what}: {err.strerror or type(err).__name__}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(field, f"larger than {MAX_FILE_BYTES // (1 << 20)} MiB, too large for {_a(what)}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(field, f"not a UTF-8 text file (byte {err.start}); expected {_a(what)}") from None


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def validation_base(info: ValidationInfo | None) -> tuple[Path, bool]:
    """(directory relative paths mean, whether to check that paths exist) for the validation under way.

    :func:`from_dict` passes the directory the user ran from; without it (a model built in code, a trial
    rebuilding its section from already absolute paths) paths are made absolute against the current directory
    and not checked."""
    context = (info.context if info is not None else None) or {}
    return Path(context.get("base") or os.getcwd()), bool(context.get("check_paths"))


def absolute_path(value: str, info: ValidationInfo | None, *, directory: bool, what: str, check: bool = True) -> str:
    """``value`` with ``~`` expanded, made absolute against the directory the user ran from (Tune runs each
    trial in its own folder, where a relative path means nothing); when paths are checked (and ``check``), one
    that is missing is a ConfigError with no field of its own (pydantic's location of the validator names it)."""
    base, check_paths = validation_base(info)
    path = Path(os.path.normpath(base / os.path.expanduser(value)))
    if check and check_paths and directory and not is_dir(path):
        raise ConfigError("", f"{quote_path(path)} does not exist or is not a directory; expected {what}")
    if check and check_paths and not directory:
        try:
            read_text_capped(path, "", what)  # exists, a regular file, at most 1 MiB, UTF-8
        except ConfigError as err:
            raise ConfigError("", f"{quote_path(path)}: {err.problem}") from None
    return str(path)


def is_dir(path: Path) -> bool:
    """``Path.is_dir`` that answers False, not OSError, for a name the OS refuses (too long, ...)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def is_file(path: Path) -> bool:
    """``Path.is_file`` that answers False, not OSError, for a name the OS refuses (too long, ...)."""
    try:
        return path.is_file()
    except OSError:
        return False


def exists(path: Path) -> bool:
    """``Path.exists`` that answers False, not OSError, for a name the OS refuses (too long, ...)."""
    try:
        return path.exists()
    except OSError:
        return False


def _numeric_kind(annotation: Any) -> str | None:
    """``"integer"`` / ``"number"`` when a field (or the items of a list/tuple field) holds ints / floats."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _numeric_kind(args[0])
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if args and origin not in (dict,):
        kinds = {_numeric_kind(arg) for arg in args if arg is not type(None) and arg is not Ellipsis}
        kinds.discard(None)
        if len(kinds) == 1:
            return kinds.pop()
    return None


def _bad_number(value: Any, kind: str | None, where: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], str] | None:
    """(position, problem) of the first true/false where a number belongs, or of a NaN/inf anywhere in ``value``
    (also inside free-form mappings such as task_options): no config value means either."""
    if isinstance(value, bool):
        if kind is not None:
            return where, f"must be {'an integer' if kind == 'integer' else 'a number'}, not {str(value).lower()}"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return where, f"must be a finite number (got {value})"
    if len(where) > MAX_YAML_DEPTH:
        return None
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
        kind = None
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _bad_number(item, kind, (*where, key))
        if found:
            return found
    return None


class StrictModel(BaseModel):
    """A config block: unknown keys are errors, numbers must be finite, true/false is not a number."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info) -> Any:
        # pydantic's lax mode reads true as 1, also inside lists; and a free-form mapping takes NaN as it is
        found = _bad_number(value, _numeric_kind(cls.model_fields[info.field_name].annotation))
        if found:
            where, problem = found
            if not where:
                raise ValueError(problem)
            raise ConfigError(".".join(map(field_part, where)), problem)
        return value


class RayConfig(StrictModel):
    """Where the experiment runs and what each trial may use."""

    address: str | None = Field(
        default=None, description="Ray cluster address (ray://..., auto, HOST:PORT); null = local embedded Ray."
    )
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs for the local embedded Ray (null = all).")
    num_gpus: int | None = Field(default=None, ge=0, description="GPUs for the local embedded Ray (null = detect).")
    cpus_per_trial: float = Field(default=1.0, gt=0, description="CPUs reserved by each Tune trial.")
    gpus_per_trial: float = Field(default=0.0, ge=0, description="GPUs reserved by each Tune trial (fractions ok).")
    max_concurrent_trials: int | None = Field(default=None, ge=1, description="Cap on trials running at once.")
    checkpoints_to_keep: int = Field(
        default=2,
        ge=1,
        description="Checkpoints kept per trial, the newest (under PBT also any a trial may still exploit), so "
        "a long sweep cannot fill the disk.",
    )
    worker_niceness: int = Field(
        default=0,
        ge=0,
        le=19,
        description="Niceness of the local embedded Ray's worker processes (Ray's own default, 15, lets every "
        "Ray and system process preempt the trials; ignored on a cluster, whose nodes set their own).",
    )
    worker_preload: list[str] = Field(
        default_factory=lambda: ["torch"],
        description="Modules the local embedded Ray's worker processes import before they connect to Ray "
        "(metaopt.worker_start: torch imported after Ray's core worker trains slower); [] = none; "
        "ignored on a cluster.",
    )
    storage_path: str | None = Field(
        default=None, description="Where Tune keeps trial dirs and checkpoints (default ./ray_results)."
    )

    @field_validator("address")
    @classmethod
    def _address_form(cls, address: str | None) -> str | None:
        if address is not None:
            parse_ray_address(address)
        return address

    @field_validator("worker_preload")
    @classmethod
    def _module_names(cls, modules: list[str]) -> list[str]:
        for name in modules:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
                raise ValueError(f"must be Python module names such as torch (got {quote(name)})")
        return modules


class TrackingConfig(StrictModel):
    """MLflow: one experiment per experiment name, a parent run per sweep, a child run per trial."""

    uri: str = Field(default="sqlite:///mlflow.db", description="MLflow tracking URI (sqlite file or http server).")
    experiment: str | None = Field(default=None, description="MLflow experiment name (default: the experiment's name).")

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, name: str | None) -> str | None:
        if name is not None:
            problem = name_problem(name, pattern=None)
            if problem:
                raise ConfigError("", problem)
        return name

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        if not re.match(r"^(sqlite:///|https?://|file:|databricks|postgresql|mysql)", uri) and not uri.startswith("/"):
            raise ValueError("must be sqlite:///PATH, http(s)://HOST:PORT, file:PATH or a database URI")
        return uri


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?:\[[0-9A-Fa-f:.]+\]|{_LABEL}(?:\.{_LABEL})*)"  # [IPv6], IPv4 or a DNS name
ADDRESS_FORMS = "auto, local, HOST:PORT or ray://HOST:PORT"


def parse_ray_address(address: str, field: str = "") -> tuple[str, int] | None:
    """(host, port) of a ``HOST:PORT`` / ``ray://HOST:PORT`` address, None for ``auto`` / ``local``; anything
    else is an error (``ray.init`` given a malformed address retries for minutes before it gives up)."""
    if address in ("auto", "local"):
        return None
    match = re.fullmatch(rf"(?:ray://)?({_HOST}):([0-9]{{1,5}})", address) if isinstance(address, str) else None
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(field, f"must be {ADDRESS_FORMS} with a port in 1-65535 (got {quote(address)})")
    return match.group(1).strip("[]"), int(match.group(2))


def check_ray_address(cli_address: str | None, ray: RayConfig, timeout: float = 2.0) -> None:
    """Before Ray or MLflow start: the address ``metaopt run`` will connect to (``--address``, else
    ``ray.address``) has a valid form and, for HOST:PORT, something accepts a TCP connection there within
    ``timeout`` seconds. (``RAY_ADDRESS``, set by Ray Jobs on the cluster, is Ray's to check.)"""
    import socket

    if cli_address is not None:
        parse_ray_address(cli_address, "--address")
    given = (("--address", cli_address), ("ray.address", ray.address))
    chosen = next(((field, address) for field, address in given if address and address != "local"), None)
    if chosen is None:
        return
    field, address = chosen
    host_port = parse_ray_address(address, field)
    if host_port is None:
        return
    try:
        socket.create_connection(host_port, timeout=timeout).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise ConfigError(
            field,
            f"nothing answers at {quote(address)} ({reason} within {timeout:g} s); start the "
            "Ray head there (ray start --head) or fix the address",
        ) from None


# pip packages of the database drivers SQLAlchemy imports (module -> package) where the names differ
_DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
    "mysql": "mysql-connector-python",
}


def check_tracking_driver(uri: str) -> None:
    """A database tracking URI (``postgresql://``, ``mysql+pymysql://`` ...) whose driver is not installed is one
    line naming the package to install, not MLflow's traceback once the run has started. SQLAlchemy itself says
    which module a URI needs (its default driver for ``postgresql`` has changed between versions)."""
    if not re.match(r"(postgresql|mysql|mssql|oracle)(\+\w+)?://", uri):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
    except (ArgumentError, ValueError) as err:  # e.g. a port that is not a number; the URI may hold a password
        raise ConfigError(
            "tracking.uri", f"not a valid {quote(uri.split('://')[0])}:// URI: {one_line(str(err), 200)}"
        ) from None
    try:
        url.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError) as err:
        raise ConfigError(
            "tracking.uri", f"SQLAlchemy cannot use {quote(uri.split('://')[0])}:// URIs: {one_line(str(err), 200)}"
        ) from None
    except ImportError as err:
        module = (err.name or "").split(".")[0] or "its driver"
        package = _DRIVER_PACKAGES.get(module, module)
        raise ConfigError(
            "tracking.uri",
            f"{quote(uri.split(':')[0])} needs the Python module {module!r}, which "
            f"is not installed: pip install '{package}'",
        ) from None


def name_problem(name: Any, pattern: str | None = NAME_PATTERN) -> str | None:
    """What is wrong with an experiment name (None: nothing): a string of at most :data:`NAME_MAX` characters,
    matching ``pattern`` in full, or (no pattern: MLflow experiment names) without control characters."""
    if not isinstance(name, str):
        return f"must be a string (got {type(name).__name__} {quote(name)})"
    if len(name) > NAME_MAX:
        return f"must be at most {NAME_MAX} characters (got {len(name)}: {quote(name)})"
    if pattern is not None and not re.fullmatch(pattern, name):
        return f"must be a string of letters, digits, _ . - (got {quote(name)})"
    if pattern is None and (not name.strip() or any(not ch.isprintable() for ch in name)):
        return f"must be a non-blank name without control characters such as newlines (got {quote(name)})"
    return None


TOP_LEVEL_KEYS = ("name", "kind", "description", "ray", "tracking")


SectionT = TypeVar("SectionT", bound=BaseModel)
ModelT = TypeVar("ModelT", bound=BaseModel)


class Experiment(BaseModel, Generic[SectionT]):
    """A validated experiment: the common blocks plus the capability's own section.

    Generic in the section, so a runner declares what it runs (``def run(exp: Experiment[PBTSection], ...)``)
    and ``exp.section.population`` is typed. :func:`from_dict` builds ``Experiment[<the kind's section>]``,
    which checks that the section is an instance of that model."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    description: str = ""
    ray: RayConfig
    tracking: TrackingConfig
    section: SectionT
    source: str | None = None

    def __reduce__(self):
        # A parametrized class (``Experiment[PBTSection]``) is not a module attribute pickle could look up by
        # name: pickle the origin class and the section's class (both importable) and parametrize again on load.
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return _rebuild_experiment, (type(self.section), fields)

    @property
    def mlflow_experiment(self) -> str:
        return self.tracking.experiment or self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, in the same shape as the file (what gets logged and replayed)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "ray": self.ray.model_dump(),
            "tracking": self.tracking.model_dump(),
            self.kind: self.section.model_dump(),
        }


def experiment_class(section_model: type[SectionT]) -> type[Experiment[SectionT]]:
    """``Experiment[section_model]`` for a section model known only at run time (the kind's)."""
    return Experiment[section_model]  # type: ignore[valid-type]  # a type checker cannot index by a variable


def _rebuild_experiment(section_model: type[BaseModel], fields: dict[str, Any]) -> Experiment:
    return experiment_class(section_model)(**fields)


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
    re.X,
)


class ExperimentLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except: ``1e-4`` is a float (not a string), duplicate keys are errors.

    Merge keys (``<<: *defaults``) work as in YAML 1.1: the mapping's own keys override merged ones, which is
    not a duplicate; a key written twice in the mapping itself is."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # SafeConstructor.flatten_mapping merges it below
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain values", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {quote(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


ExperimentLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in list("-+0123456789."):
    ExperimentLoader.yaml_implicit_resolvers[_first] = [
        (tag, regexp)
        for tag, regexp in ExperimentLoader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"
    ]
ExperimentLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, refusing documents that would cost a crash or unbounded memory."""
    check_yaml_size(text)
    try:
        return yaml.load(text, Loader=ExperimentLoader)
    except (ValueError, OverflowError, RecursionError) as err:  # e.g. an integer past Python's 4300 digits
        raise yaml.YAMLError(str(err).splitlines()[0][:200]) from None


def check_yaml_size(text: str) -> None:
    """Walk the YAML event stream (no recursion, nothing built) and refuse, as a YAMLError with its position,
    collections nested deeper than :data:`MAX_YAML_DEPTH` (PyYAML's composer recurses per level) and documents
    whose aliases expand to more than :data:`MAX_YAML_NODES` values ("billion laughs": a few lines of anchors
    that every consumer walking the result would expand to 10^9 values; a scalar counts once per 100
    characters, so aliases to one long string are bounded too), or an alias inside its own anchor."""
    sizes: dict[str, int] = {}  # anchor -> values under it, aliases expanded
    open_: list[list[Any]] = []  # per open collection: [anchor, values so far]
    total = 0
    for event in yaml.parse(text, Loader=ExperimentLoader):
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_):
                raise yaml.YAMLError(f"alias *{event.anchor} refers to a node that contains it ({_line(event)})")
            size = sizes.get(event.anchor or "", 1)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            open_.append([event.anchor, 1])
            if len(open_) > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels ({_line(event)})")
            continue
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, size = open_.pop()
            if anchor is not None:
                sizes[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            size = 1 + len(event.value) // 100  # a long string costs like many values once aliases repeat it
            if event.anchor is not None:
                sizes[event.anchor] = size
        else:
            continue
        if open_:
            open_[-1][1] += size
        total += size if not open_ else 0
        if (open_ and open_[-1][1] > MAX_YAML_NODES) or total > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"expands to more than {MAX_YAML_NODES} values through its aliases "
                f"({_line(event)}); write the values out or use fewer aliases"
            )


def _line(event: yaml.Event) -> str:
    """Where an event starts, as an error line says it (PyYAML's parser always sets the mark)."""
    return f"line {event.start_mark.line + 1}" if event.start_mark is not None else "position unknown"


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_paths: bool = True) -> Experiment:
    """Read, override and validate an experiment file. Raises ConfigError (one line) on any problem.
    ``check_paths``: see :func:`from_dict`."""
    raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw, source=str(path), check_paths=check_paths)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = read_text_capped(path, str(path), "experiment .yaml file")
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(str(path), f"invalid YAML{where}: {problem}") from None
    if raw is None:
        raise ConfigError(str(path), "file is empty; expected a mapping with name, kind and a section for the kind")
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"top level must be a mapping, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML: numbers, bools, lists) to the raw mapping in place."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"expected KEY=VALUE like pbt.population=8, got {quote(override)}")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError("--set", f"bad key {quote(key)}: use dotted names like pbt.population")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}  # an empty section in the file (``pbt:``) reads as null
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a {type(child).__name__}, cannot set {key}")
        node = child
    node[parts[-1]] = value


def from_dict(
    raw: dict[str, Any], source: str | None = None, check_paths: bool = True, python_objects: bool = False
) -> Experiment:
    """Validate a raw mapping (as read from YAML) into an Experiment.

    Relative paths (and ``~``) in the file are made absolute against the current directory, the one the user ran
    from: Tune runs every trial in a folder of its own. ``check_paths`` (what runs here: ``metaopt run``) also
    checks that they exist here and that a database tracking URI's driver is installed; ``metaopt list`` and
    ``metaopt submit`` (whose paths are the cluster's) pass False. ``python_objects``: only the Python API
    (:mod:`metaopt.api`) passes True, accepting the ``pickle:`` references it wrote (:mod:`metaopt.user_code`)."""
    allowed_kinds = ", ".join(registry.kinds()) or "none; no capability is installed (pip install -e . installs them)"
    name = raw.get("name")
    if name is None:
        raise ConfigError("name", "missing; give the experiment a name (letters, digits, _ . -)")
    problem = name_problem(name)
    if problem:
        raise ConfigError("name", problem)
    kind = raw.get("kind")
    if kind is None:
        raise ConfigError("kind", f"missing; allowed: {allowed_kinds}")
    if not isinstance(kind, str) or kind not in registry.kinds():
        raise ConfigError("kind", f"unknown kind {quote(kind)}; allowed: {allowed_kinds}")
    capability = registry.get(kind)
    allowed = (*TOP_LEVEL_KEYS, kind)
    for key in raw:
        if key not in allowed:
            raise ConfigError(field_part(key), f"unknown key; allowed at top level: {', '.join(allowed)}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError("description", f"must be a string (got {type(description).__name__})")
    context = {"base": os.getcwd(), "check_paths": check_paths, "python_objects": python_objects}
    if capability.extra is not None:  # before the section, whose checks may import the extra's modules; only
        extras.require(capability.extra, kind, context)  # where it runs (submit: the cluster has its own packages)
    section = _validate_block(kind, capability.section, raw.get(kind), context)
    check = getattr(section, "check", None)
    if check:
        try:
            check()  # checks that need other modules (optimizer specs, task options)
        except ConfigError as err:
            raise ConfigError(f"{kind}.{one_line(err.field, 200)}", one_line(err.problem, 500)) from None
    tracking = _validate_block("tracking", TrackingConfig, raw.get("tracking"), context)
    if check_paths:
        check_tracking_driver(tracking.uri)
    return experiment_class(capability.section)(
        name=name,
        kind=kind,
        description=description,
        ray=_validate_block("ray", RayConfig, raw.get("ray"), context),
        tracking=tracking,
        section=section,
        source=source,
    )


def runner_for(kind: str) -> Callable[..., Any]:
    """The run function of a kind, imported only now (so `metaopt list` never imports Ray)."""
    return registry.get(kind).load_runner()


def _validate_block(field: str, model: type[ModelT], value: Any, context: dict[str, Any] | None = None) -> ModelT:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(field, f"must be a mapping of settings, got {type(value).__name__} {quote(value)}")
    try:
        return model.model_validate(value, context=context)
    except ValidationError as err:
        raise first_error(field, model, err) from None


def first_error(prefix: str, model: type[BaseModel], err: ValidationError) -> ConfigError:
    """Turn pydantic's first error into one line: ``pbt.population: must be >= 2 (got 1)``."""
    first = err.errors()[0]
    loc = [field_part(p) for p in first["loc"]]
    field = ".".join(part for part in (prefix, *loc) if part)
    original = first.get("ctx", {}).get("error")
    if isinstance(original, ConfigError):  # a check that names its own field (or "": the field itself, quoted)
        return ConfigError(".".join(part for part in (field, original.field) if part), original.problem)
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, first["loc"][:-1])
        return ConfigError(field, f"unknown key; allowed: {', '.join(allowed)}")
    message = first["msg"]
    for noise in ("Value error, ", "Assertion failed, "):
        message = message.replace(noise, "")
    if "input" in first and first["type"] != "missing" and "(got " not in message:
        message = f"{message} (got {quote(first['input'])})"
    return ConfigError(field, message)


def one_line(text: str, limit: int) -> str:
    """A message from another module's check as part of the one error line: newlines escaped, at most ``limit``
    characters (it may quote user input whole)."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[: limit - 20]}...{text[-17:]}"


def field_part(part: Any) -> str:
    """One step of a field path as written in an error line: a plain key or index as is, anything else quoted
    (a key with a newline or 10 kB long must not break the one-line error)."""
    text = str(part)
    return text if re.fullmatch(r"[\w.+-]{1,60}", text) else quote(part)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed where pydantic found an unknown one: the fields of the model at ``loc``, walking into
    lists, mappings, optionals and discriminated unions (whose tag is a step of pydantic's location)."""
    current: Any = model
    for part in loc:
        current = _step_into(current, part)
        if current is None:
            return []
    fields = getattr(_unwrap(current), "model_fields", None)
    return sorted(fields) if fields else []


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _step_into(annotation: Any, part: Any) -> Any:
    """The annotation one step of an error location below ``annotation`` (None: not found)."""
    annotation = _unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(part)
        return field.annotation if field is not None else None
    if origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (typing.Union, types.UnionType):
        members = [_unwrap(arg) for arg in args if arg is not type(None)]
        for member in members:  # a discriminated union's tag: the member whose literal field equals it
            fields = getattr(member, "model_fields", {})
            if any(
                typing.get_origin(f.annotation) is typing.Literal and part in typing.get_args(f.annotation)
                for f in fields.values()
            ):
                return member
        for member in members:
            found = _step_into(member, part)
            if found is not None:
                return found
    return None
