"""Specs chosen by ``name``: a discriminated union on ``name`` whose members are registered, not listed.

An optimizer or schedule spec is written in YAML as a mapping with a ``name`` (``{name: cosine, lr: 0.1,
total_steps: 1000}``). Each name has its own pydantic model (its own fields, bounds and defaults); a
:class:`NamedSpecs` table maps names to models, so a capability can add a member (``symbolic`` adds the
``program`` optimizer) without this package importing it. pydantic's own ``Field(discriminator=...)`` needs
every member when the union is declared and puts the tag in error locations (``optimizer.sgd.momentum``);
dispatching on ``name`` here keeps the error line the user's own path: ``optimizer.momentum: ...``.

Numbers in specs are strict (``Strict()``): YAML and JSON give them typed, so ``lr: "0.1"`` is a typo to
report, not a string to parse.
"""

from __future__ import annotations

import numbers
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BeforeValidator, Field, SerializeAsAny, Strict, ValidationError, ValidationInfo

from metaopt.config import StrictModel, first_error, quote
from metaopt.errors import ConfigError

#: A finite real number given as a number (not a string, not true/false: StrictModel rejects those).
Number = Annotated[float, Strict()]
#: A learning rate: finite and > 0.
LearningRate = Annotated[Number, Field(gt=0)]
#: A coefficient of a running average (momentum, betas): 1 would never forget, so the range is open at 1.
Decay = Annotated[Number, Field(ge=0, lt=1)]


def plain_int(value: Any) -> Any:
    """An integer of any kind (``numpy.int64`` from an array, a step counter of another library) as a Python
    int; anything else unchanged, for the strict check after it to refuse (a bool, a float, a string)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


#: A whole number given as an integer of any kind (``numpy.int64`` too), never as a float, string or bool.
Integer = Annotated[int, Strict(), BeforeValidator(plain_int)]
#: A number of optimizer steps.
StepCount = Annotated[Integer, Field(ge=0)]


def beta_pair(value: Any) -> Any:
    """Refuse anything but two coefficients as a whole, in the words of the field (pydantic would report a
    missing second item as ``betas.1: Field required``); each item is then checked on its own."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError("must be a pair [beta1, beta2], each in [0, 1)")
    return value


#: The two decay rates of Adam-like optimizers: (first moment, second moment) in Adam and AdamW, (update
#: interpolation, momentum) in Lion (Chen et al. 2023, Algorithm 2); a list in YAML.
Betas = Annotated[tuple[Decay, Decay], BeforeValidator(beta_pair)]


class NamedSpec(StrictModel):
    """One member of a :class:`NamedSpecs` union; a subclass fixes ``name`` to ``Literal["its name"]``."""

    name: str


Spec = TypeVar("Spec", bound=NamedSpec)


def join_field(*parts: str) -> str:
    """``optimizer`` + ``momentum`` -> ``optimizer.momentum``; empty parts are left out."""
    return ".".join(part for part in parts if part)


def literal_name(model: type[NamedSpec]) -> str:
    """The name a spec model answers to: the one value of its ``name: Literal[...]`` field."""
    values = typing.get_args(model.model_fields["name"].annotation)
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{model.__name__}.name must be annotated Literal['<its name>']")
    return values[0]


class NamedSpecs(Generic[Spec]):
    """name -> spec model, and validation of a spec (a mapping, or a model already) by its ``name``.

    ``what`` is the field a spec is written under (``optimizer``, ``schedule``): errors of :meth:`parse` name
    ``<what>.<key>``. ``load_providers`` (optional) is called before every lookup, so members registered by
    other packages are there when a name is looked up or the allowed names are listed."""

    def __init__(self, what: str, load_providers: Callable[[], None] | None = None):
        self.what = what
        self._models: dict[str, type[Spec]] = {}
        self._load_providers = load_providers

    def register(self, name: str, model: type[Spec]) -> None:
        """Make ``name`` valid; registering the same model twice is harmless, another one under a taken name
        is a programming error."""
        if literal_name(model) != name:
            raise TypeError(f"{model.__name__} answers to {literal_name(model)!r}, not {name!r}")
        if self._models.get(name, model) is not model:
            raise ValueError(f"{self.what} {name!r} is already registered as {self._models[name].__name__}")
        self._models[name] = model

    def models(self) -> dict[str, type[Spec]]:
        if self._load_providers is not None:
            self._load_providers()
        return dict(self._models)

    def names(self) -> tuple[str, ...]:
        """The allowed names, in registration order."""
        return tuple(self.models())

    def model(self, name: Any, field: str | None = None) -> type[Spec]:
        """The model of ``name``; anything else is a ConfigError on ``<field>.name`` listing the allowed names."""
        models = self.models()
        if isinstance(name, str) and name in models:
            return models[name]
        got = "missing" if name is None else f"got {quote(name)}"
        where = join_field(self.what if field is None else field, "name")
        raise ConfigError(where, f"must be one of {', '.join(models)}; {got}")

    def parse(self, spec: Any, field: str | None = None, context: dict[str, Any] | None = None) -> Spec:
        """The validated model of ``spec`` (returned as is when it is a model already).

        Raises one ConfigError naming ``<field>.<key>`` (``field`` defaults to ``what``). ``context`` is
        pydantic's validation context (the directory relative paths mean, see :func:`metaopt.config.from_dict`)."""
        field = self.what if field is None else field
        if isinstance(spec, NamedSpec):
            self.model(spec.name, field)  # a model of a name that is not (or no longer) registered is refused too
            return typing.cast(Spec, spec)
        if not isinstance(spec, Mapping):
            raise ConfigError(field, f"must be a mapping of settings with a name, got {type(spec).__name__}")
        model = self.model(spec.get("name"), field)
        try:
            return model.model_validate(dict(spec), context=context)
        except ValidationError as err:
            raise first_error(field, model, err) from None

    def field_type(self, *, optional: bool = False) -> Any:
        """The annotation of a config field holding one of these specs (``None`` too when ``optional``).

        The stored value is the member's model; ``model_dump`` writes all of its fields (``SerializeAsAny``),
        so a section dumped for Tune or MLflow carries the whole resolved spec as plain data."""

        def validate(value: Any, info: ValidationInfo) -> Any:
            if value is None and optional:
                return None
            # field "": pydantic's location already names the section field the spec is written under
            return self.parse(value, field="", context=info.context)

        stored = SerializeAsAny[NamedSpec]
        return Annotated[stored | None if optional else stored, BeforeValidator(validate)]
