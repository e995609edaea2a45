"""Typed experiment files: YAML in, one validated :class:`Experiment` out, or one clear error line.

An experiment file has a fixed top level (``name``, ``kind``, ``description``, ``ray``, ``tracking``) and one
section named after its ``kind`` holding that capability's typed config (e.g. ``pbt:``). ``--set a.b=v``
overrides are applied to the raw mapping before validation, so they are checked exactly like the file.
Every problem becomes a :class:`~metaopt.errors.ConfigError` whose text names the field (``pbt.population``)
and what is allowed; the CLI prints it and exits 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from metaopt.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StrictModel(BaseModel):
    """A config block: unknown keys are errors, numbers must be finite, true/false is not a number."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation in (int, int | None):
            raise ValueError(f"must be an integer, not {str(value).lower()}")
        if isinstance(value, bool) and annotation in (float, float | None):
            raise ValueError(f"must be a number, not {str(value).lower()}")
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
    worker_niceness: int = Field(
        default=0, ge=0, le=19,
        description="Niceness of the local embedded Ray's worker processes (Ray's own default, 15, lets every "
        "Ray and system process preempt the trials; ignored on a cluster, whose nodes set their own).",
    )
    worker_preload: list[str] = Field(
        default_factory=lambda: ["torch"],
        description="Modules the local embedded Ray's worker processes import before they connect to Ray "
        "(metaopt.worker_start: torch imported after Ray's core worker trains ~10-20% slower); [] = none; "
        "ignored on a cluster.",
    )
    storage_path: str | None = Field(
        default=None, description="Where Tune keeps trial dirs and checkpoints (default ./ray_results)."
    )

    @field_validator("worker_preload")
    @classmethod
    def _module_names(cls, modules: list[str]) -> list[str]:
        for name in modules:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
                raise ValueError(f"must be Python module names such as torch (got {name!r})")
        return modules


class TrackingConfig(StrictModel):
    """MLflow: one experiment per experiment name, a parent run per sweep, a child run per trial."""

    uri: str = Field(default="sqlite:///mlflow.db", description="MLflow tracking URI (sqlite file or http server).")
    experiment: str | None = Field(default=None, description="MLflow experiment name (default: the experiment's name).")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        if not re.match(r"^(sqlite:///|https?://|file:|databricks|postgresql|mysql)", uri) and not uri.startswith("/"):
            raise ValueError("must be sqlite:///PATH, http(s)://HOST:PORT, file:PATH or a database URI")
        return uri


# kind -> (section model, "module:function" that runs it). Sections register themselves from their own
# packages' config modules, which import nothing heavy, so loading a file never imports Ray or torch.
_KINDS: dict[str, tuple[type[StrictModel], str]] = {}


def register_kind(kind: str, section: type[StrictModel], runner: str) -> None:
    """Make ``kind`` valid in experiment files, with ``section`` as its typed config block."""
    _KINDS[kind] = (section, runner)


def kinds() -> dict[str, tuple[type[StrictModel], str]]:
    _load_builtin_kinds()
    return dict(_KINDS)


def _load_builtin_kinds() -> None:
    # Imported for their side effect of registering; kept here so config has one entry point.
    import metaopt.federated.config  # noqa: F401
    import metaopt.objectives.config  # noqa: F401
    import metaopt.pbt.config  # noqa: F401
    import metaopt.posttrain.config  # noqa: F401
    import metaopt.symbolic.config  # noqa: F401


TOP_LEVEL_KEYS = ("name", "kind", "description", "ray", "tracking")


class Experiment(BaseModel):
    """A validated experiment: the common blocks plus the capability's own section."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    description: str = ""
    ray: RayConfig
    tracking: TrackingConfig
    section: Any
    source: str | None = None

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


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
    re.X,
)


class ExperimentLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except: ``1e-4`` is a float (not a string), duplicate keys are errors."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(None, None, "mapping keys must be plain values", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


ExperimentLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in list("-+0123456789."):
    ExperimentLoader.yaml_implicit_resolvers[_first] = [
        (tag, regexp) for tag, regexp in ExperimentLoader.yaml_implicit_resolvers.get(_first, []) if tag != "tag:yaml.org,2002:float"
    ]
ExperimentLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ExperimentLoader)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read, override and validate an experiment file. Raises ConfigError (one line) on any problem."""
    raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw, source=str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(str(path), "file not found")
    if path.is_dir():
        raise ConfigError(str(path), "is a directory, expected an experiment .yaml file")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), f"not a UTF-8 text file (byte {err.start}); expected an experiment .yaml file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(str(path), f"invalid YAML at {where}{problem}") from None
    if raw is None:
        raise ConfigError(str(path), "file is empty; expected a mapping with name, kind and a section for the kind")
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"top level must be a mapping, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML: numbers, bools, lists) to the raw mapping in place."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"expected KEY=VALUE like pbt.population=8, got {override!r}")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError("--set", f"bad key {key!r}: use dotted names like pbt.population")
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


def from_dict(raw: dict[str, Any], source: str | None = None) -> Experiment:
    """Validate a raw mapping (as read from YAML) into an Experiment."""
    registry = kinds()
    name = raw.get("name")
    if name is None:
        raise ConfigError("name", "missing; give the experiment a name (letters, digits, _ . -)")
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise ConfigError("name", f"must be a string of letters, digits, _ . - (got {name!r})")
    kind = raw.get("kind")
    if kind is None:
        raise ConfigError("kind", f"missing; allowed: {', '.join(sorted(registry))}")
    if not isinstance(kind, str) or kind not in registry:
        raise ConfigError("kind", f"unknown kind {kind!r}; allowed: {', '.join(sorted(registry))}")
    allowed = (*TOP_LEVEL_KEYS, kind)
    for key in raw:
        if key not in allowed:
            raise ConfigError(str(key), f"unknown key; allowed at top level: {', '.join(allowed)}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError("description", f"must be a string (got {type(description).__name__})")
    section_model, _ = registry[kind]
    section = _validate_block(kind, section_model, raw.get(kind))
    check = getattr(section, "check", None)
    if check:
        try:
            check()  # checks that need other modules (optimizer specs, task options)
        except ConfigError as err:
            raise ConfigError(f"{kind}.{err.field}", err.problem) from None
    return Experiment(
        name=name,
        kind=kind,
        description=description,
        ray=_validate_block("ray", RayConfig, raw.get("ray")),
        tracking=_validate_block("tracking", TrackingConfig, raw.get("tracking")),
        section=section,
        source=source,
    )


def runner_for(kind: str) -> Callable[..., Any]:
    """Import the run function of a capability lazily (so `metaopt list` never imports Ray)."""
    import importlib

    _, target = kinds()[kind]
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _validate_block(field: str, model: type[StrictModel], value: Any) -> StrictModel:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(field, f"must be a mapping of settings, got {type(value).__name__} {value!r}")
    try:
        return model.model_validate(value)
    except ValidationError as err:
        raise _first_error(field, model, err) from None


def _first_error(prefix: str, model: type[BaseModel], err: ValidationError) -> ConfigError:
    """Turn pydantic's first error into one line: ``pbt.population: must be >= 2 (got 1)``."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    field = ".".join([prefix, *loc])
    original = first.get("ctx", {}).get("error")
    if isinstance(original, ConfigError):  # a cross-field check that names its own field
        return ConfigError(".".join([field, original.field]), original.problem)
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, first["loc"][:-1])
        return ConfigError(field, f"unknown key; allowed: {', '.join(allowed)}")
    message = first["msg"]
    for noise in ("Value error, ", "Assertion failed, "):
        message = message.replace(noise, "")
    if "input" in first and first["type"] != "missing":
        message = f"{message} (got {first['input']!r})"
    return ConfigError(field, message)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        current = field.annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []
