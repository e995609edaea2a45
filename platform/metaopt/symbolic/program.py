"""Optimizer programs as data (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Sec. 2.1).

A program is the body of ``def train(w, g, m, v, lr): ... return update, m, v``: a sequence of assignments,
each calling one primitive on variables or constants. The training loop applies ``w = w - update`` to every
parameter tensor and keeps ``m`` and ``v`` as per-parameter state. Programs are plain frozen data: hashable,
JSON-serialisable (:meth:`Program.to_json` / :meth:`Program.from_json`), printed as Python-like text by
:mod:`metaopt.symbolic.text` and executed by :mod:`metaopt.symbolic.interpreter` -- never through ``eval``.

Types: every value is a ``tensor`` (shaped like the parameter it belongs to) or a ``scalar`` (one number per
parameter tensor, or a global one such as ``lr``). :data:`PRIMITIVES` gives each primitive's arity and the
rule for its result type; :func:`result_type` applies it (``None`` = the call is invalid).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TENSOR = "tensor"
SCALAR = "scalar"

INPUTS: tuple[str, ...] = ("w", "g", "m", "v", "lr")
INPUT_TYPES: dict[str, str] = {"w": TENSOR, "g": TENSOR, "m": TENSOR, "v": TENSOR, "lr": SCALAR}
OUTPUTS: tuple[str, ...] = ("update", "m", "v")

#: Named constants a program may use (besides numeric literals).
NAMED_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "eps": 1e-8}


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Const:
    """A numeric literal, or a named constant (``name`` in :data:`NAMED_CONSTANTS`, ``value`` its number)."""

    value: float
    name: str | None = None


Arg = Var | Const


@dataclass(frozen=True)
class Statement:
    target: str
    op: str
    args: tuple[Arg, ...]


# ---- primitives --------------------------------------------------------------------------------------------
# Type rules. ``same``: tensor if any argument is a tensor, else scalar (elementwise, broadcasting a scalar).


def _same(*types: str) -> str:
    return TENSOR if TENSOR in types else SCALAR


def _tensor_to_scalar(t: str) -> str | None:
    return SCALAR if t == TENSOR else None


def _two_tensors_to_scalar(a: str, b: str) -> str | None:
    return SCALAR if a == TENSOR and b == TENSOR else None


def _tensor_and_scalar(x: str, c: str) -> str | None:
    return TENSOR if x == TENSOR and c == SCALAR else None


UNARY_MATH = (
    "abs",
    "cos",
    "sin",
    "tan",
    "arcsin",
    "arccos",
    "arctan",
    "sinh",
    "cosh",
    "tanh",
    "arcsinh",
    "arccosh",
    "arctanh",
    "exp",
    "exp2",
    "exp10",
    "expm1",
    "log",
    "log10",
    "log2",
    "sqrt",
    "log1p",
    "square",
    "cube",
    "cbrt",
    "sign",
    "reciprocal",
    "negative",
)
#: Infix binary operators, as printed in program text.
INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclass(frozen=True)
class Primitive:
    name: str
    arity: int
    result: Callable[..., str | None]
    doc: str


def _primitives() -> dict[str, Primitive]:
    table = {name: Primitive(name, 1, _same, "elementwise math (log/sqrt on |x|)") for name in UNARY_MATH}
    for name in ("add", "sub", "mul", "div", "max", "min", "power"):
        table[name] = Primitive(name, 2, _same, "elementwise binary, scalars broadcast")
    table["interp"] = Primitive("interp", 3, _same, "interp(x, y, a) = (1 - a) * x + a * y")
    table["norm"] = Primitive("norm", 1, _tensor_to_scalar, "L2 norm of one tensor")
    table["global_norm"] = Primitive("global_norm", 1, _tensor_to_scalar, "L2 norm over all parameter tensors")
    table["dot"] = Primitive("dot", 2, _two_tensors_to_scalar, "sum(x * y) of one tensor pair")
    table["cosine_sim"] = Primitive("cosine_sim", 2, _two_tensors_to_scalar, "dot / (norm * norm)")
    table["clip_by_global_norm"] = Primitive(
        "clip_by_global_norm", 2, _tensor_and_scalar, "x scaled so the global norm of all tensors is <= c"
    )
    table["clip"] = Primitive("clip", 2, _same, "clip(x, c) = min(max(x, -|c|), |c|)")
    return table


PRIMITIVES: dict[str, Primitive] = _primitives()


def result_type(op: str, arg_types: list[str]) -> str | None:
    """The type of ``op(args)``, or None when the call is invalid (unknown op, wrong arity, wrong types)."""
    primitive = PRIMITIVES.get(op)
    if primitive is None or len(arg_types) != primitive.arity:
        return None
    return primitive.result(*arg_types)


# ---- programs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    statements: tuple[Statement, ...]

    def __len__(self) -> int:
        return len(self.statements)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": list(INPUTS),
            "outputs": list(OUTPUTS),
            "statements": [
                {"target": s.target, "op": s.op, "args": [_arg_to_json(a) for a in s.args]} for s in self.statements
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Program:
        try:
            statements = tuple(
                Statement(str(s["target"]), str(s["op"]), tuple(_arg_from_json(a) for a in s["args"]))
                for s in data["statements"]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a program document: {err}") from None
        return cls(statements)

    @classmethod
    def from_json(cls, text: str) -> Program:
        return cls.from_dict(json.loads(text))


def _arg_to_json(arg: Arg) -> Any:
    if isinstance(arg, Var):
        return {"var": arg.name}
    return {"const": arg.name} if arg.name else {"value": arg.value}


def _arg_from_json(data: Any) -> Arg:
    if "var" in data:
        return Var(str(data["var"]))
    if "const" in data:
        name = str(data["const"])
        if name not in NAMED_CONSTANTS:
            raise ValueError(f"unknown named constant {name!r}; allowed: {', '.join(NAMED_CONSTANTS)}")
        return Const(NAMED_CONSTANTS[name], name)
    return Const(float(data["value"]))


def const(value: float | str) -> Const:
    """``const(0.9)`` or ``const("pi")``."""
    if isinstance(value, str):
        return Const(NAMED_CONSTANTS[value], value)
    return Const(float(value))


def stmt(target: str, op: str, *args: str | float | Arg) -> Statement:
    """Shorthand: strings are variables (or named constants), numbers are constants."""

    def as_arg(a: str | float | Arg) -> Arg:
        if isinstance(a, (Var, Const)):
            return a
        if isinstance(a, str):
            return Const(NAMED_CONSTANTS[a], a) if a in NAMED_CONSTANTS else Var(a)
        return Const(float(a))

    return Statement(target, op, tuple(as_arg(a) for a in args))


def adamw_program(
    beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 0.01, lr_scale: float = 0.001
) -> Program:
    """The search's start program (PAPERS.md): AdamW without bias correction and without epsilon."""
    return Program(
        (
            stmt("g2", "square", "g"),
            stmt("m", "interp", "g", "m", beta1),
            stmt("v", "interp", "g2", "v", beta2),
            stmt("sqrt_v", "sqrt", "v"),
            stmt("update", "div", "m", "sqrt_v"),
            stmt("wd", "mul", "w", weight_decay),
            stmt("update", "add", "update", "wd"),
            stmt("lr", "mul", "lr", lr_scale),
            stmt("update", "mul", "update", "lr"),
        )
    )


def lion_program(beta1: float = 0.9, beta2: float = 0.99, weight_decay: float = 0.0) -> Program:
    """Lion (Chen et al. 2023, Program 1):
    update = lr * (sign(interp(g, m, beta1)) + wd * w); m = interp(g, m, beta2)."""
    return Program(
        (
            stmt("c", "interp", "g", "m", beta1),
            stmt("s", "sign", "c"),
            stmt("wd", "mul", "w", weight_decay),
            stmt("u", "add", "s", "wd"),
            stmt("update", "mul", "u", "lr"),
            stmt("m", "interp", "g", "m", beta2),
        )
    )


#: Programs a user names instead of writing them (``symbolic.start: lion``, ``{"name": "program", "program":
#: "adamw"}``): the one list of built-in names, read by the loader and by the file-name rule.
BUILTIN_PROGRAMS: dict[str, Callable[[], Program]] = {"adamw": adamw_program, "lion": lion_program}
