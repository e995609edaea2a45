"""Run optimizer programs on tensors (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Sec. 2.1).

A program (:mod:`metaopt.symbolic.program`) is executed for all parameter tensors of a model at once, so that
primitives such as ``global_norm`` can aggregate across tensors. Every variable holds a list with one value per
parameter tensor: a tensor shaped like the parameter, or a 0-dim tensor for a ``scalar`` (``lr`` and constants are
0-dim tensors in each parameter's dtype, broadcast by the elementwise primitives).

The semantics of each primitive is written once, in :data:`ELEMENTWISE` and :data:`GLOBAL`, as functions of an
array namespace ``xp`` (``torch`` or ``jax.numpy``: both provide every function used here). :func:`run_program`
is the torch interpreter; :func:`metaopt.symbolic.export.program_optax` runs the same table on ``jax.numpy``.

Non-finite guard: an output (``update``, ``m``, ``v``) entry that is inf or nan is replaced by 0, so a bad
program cannot blow up training, and the result reports ``finite=False``. The guard alone would hide a broken
program (an always-NaN update makes no updates and scores like an untrained model), so the result also names
the outputs that were non-finite *by the program's fault* (:func:`faulty_entries`): inf anywhere, or NaN
where the parameter had a gradient or optimizer state. NaN at an entry whose ``g``, ``m`` and ``v`` are all 0
(a weight that never had a gradient, e.g. a first-layer weight of an always-blank pixel) is the 0/0 of
``m / sqrt(v)`` in AdamW without epsilon (Chen et al. 2023's start program): there the guard's 0 is the
update, as an epsilon would make it. The symbolic search fails a program on a faulty output at any step
(:func:`metaopt.symbolic.export.raise_on_nonfinite`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch

from metaopt.symbolic.program import OUTPUTS, Const, Program, Var
from metaopt.symbolic.text import check_program

__all__ = [
    "ELEMENTWISE",
    "GLOBAL",
    "TORCH",
    "ProgramResult",
    "TorchBackend",
    "evaluate",
    "faulty_entries",
    "run_backend",
    "run_program",
]


# ---- primitive semantics (shared by every backend) ---------------------------------------------------------


def _cosine_sim(xp: Any, x: Any, y: Any) -> Any:
    dot = xp.sum(x * y)
    den = xp.sqrt(xp.sum(x * x)) * xp.sqrt(xp.sum(y * y))
    positive = den > 0
    return xp.where(positive, dot / xp.where(positive, den, xp.ones_like(den)), xp.zeros_like(dot))


def _abs_then(name: str) -> Callable[[Any, Any], Any]:
    return lambda xp, x: getattr(xp, name)(xp.abs(x))


#: Primitives computed per parameter tensor: ``fn(xp, *args)`` on that tensor's values (scalars are 0-dim).
ELEMENTWISE: dict[str, Callable[..., Any]] = {
    **{
        name: (lambda n: lambda xp, x: getattr(xp, n)(x))(name)
        for name in (
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
            "expm1",
            "log1p",
            "square",
            "sign",
        )
    },
    **{name: _abs_then(name) for name in ("log", "log10", "log2", "sqrt")},
    "exp10": lambda xp, x: xp.pow(10.0, x),
    "cube": lambda xp, x: x * x * x,
    "cbrt": lambda xp, x: xp.sign(x) * xp.pow(xp.abs(x), 1.0 / 3.0),
    "reciprocal": lambda xp, x: 1.0 / x,
    "negative": lambda xp, x: -x,
    "add": lambda xp, x, y: x + y,
    "sub": lambda xp, x, y: x - y,
    "mul": lambda xp, x, y: x * y,
    "div": lambda xp, x, y: x / y,
    "max": lambda xp, x, y: xp.maximum(x, y),
    "min": lambda xp, x, y: xp.minimum(x, y),
    "power": lambda xp, x, y: xp.pow(x, y),
    "interp": lambda xp, x, y, a: (1 - a) * x + a * y,
    "clip": lambda xp, x, c: xp.minimum(xp.maximum(x, -xp.abs(c)), xp.abs(c)),
    "norm": lambda xp, x: xp.sqrt(xp.sum(x * x)),
    "dot": lambda xp, x, y: xp.sum(x * y),
    "cosine_sim": _cosine_sim,
}


class Backend(Protocol):
    """What the evaluator needs besides the array namespace ``xp``."""

    xp: Any

    def constants(self, value: Any, likes: Sequence[Any]) -> list[Any]:
        """``value`` (a number or a 1-element array) as a 0-dim array in the dtype/device of each of ``likes``."""

    def cast(self, x: Any, like: Any) -> Any:
        """``x`` in the dtype/device of ``like``."""


def _global_norm(backend: Backend, xs: list[Any]) -> list[Any]:
    xp = backend.xp
    if not xs:
        return []
    total = backend.cast(xp.sum(xs[0] * xs[0]), xs[0])
    for x in xs[1:]:
        total = total + backend.cast(xp.sum(x * x), xs[0])
    norm = xp.sqrt(total)
    return [backend.cast(norm, x) for x in xs]


def _clip_by_global_norm(backend: Backend, xs: list[Any], cs: list[Any]) -> list[Any]:
    xp = backend.xp
    out = []
    for x, c, norm in zip(xs, cs, _global_norm(backend, xs)):
        safe = xp.where(norm > 0, norm, xp.ones_like(norm))
        out.append(x * xp.minimum(xp.ones_like(norm), xp.abs(c) / safe))
    return out


#: Primitives that look at all parameter tensors: ``fn(backend, *arg_lists) -> list`` (one value per tensor).
GLOBAL: dict[str, Callable[..., list[Any]]] = {
    "global_norm": _global_norm,
    "clip_by_global_norm": _clip_by_global_norm,
}


# ---- evaluation --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _checked(program: Program) -> Program:
    check_program(program)
    return program


def evaluate(program: Program, backend: Backend, inputs: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Run the statements; ``inputs`` maps each input name to its per-parameter values. Returns all variables."""
    _checked(program)
    env = dict(inputs)
    likes = inputs["w"]
    constants: dict[str, list[Any]] = {}

    def values(arg: Var | Const) -> list[Any]:
        if isinstance(arg, Var):
            return env[arg.name]
        key = repr(float(arg.value))
        if key not in constants:
            constants[key] = backend.constants(float(arg.value), likes)
        return constants[key]

    for statement in program.statements:
        args = [values(a) for a in statement.args]
        if statement.op in GLOBAL:
            env[statement.target] = GLOBAL[statement.op](backend, *args)
        else:
            fn = ELEMENTWISE[statement.op]
            xp = backend.xp
            env[statement.target] = [fn(xp, *per_tensor) for per_tensor in zip(*args)]
    return env


def faulty_entries(xp: Any, x: Any, silent: Any) -> Any:
    """Entries of an output that are non-finite by the program's fault: inf anywhere, NaN unless ``silent``
    (the parameter entry has ``g == m == v == 0``: no information, so 0/0 there is indeterminate, not wrong)."""
    return xp.logical_not(xp.isfinite(x) | (xp.isnan(x) & silent))


def run_backend(
    program: Program,
    backend: Backend,
    params: Sequence[Any],
    grads: Sequence[Any],
    m: Sequence[Any],
    v: Sequence[Any],
    lr: Any,
) -> tuple[list[Any], list[Any], list[Any], Any, Any]:
    """Backend-neutral core of :func:`run_program`: ``(updates, m, v, finite, faulty)``, with ``finite`` a 0-dim
    bool array (every output entry finite) and ``faulty`` a bool array with one entry per name in
    :data:`~metaopt.symbolic.program.OUTPUTS` (that output has :func:`faulty_entries`); outputs are shaped and
    typed like the parameters, non-finite entries replaced by 0."""
    n = len(params)
    if not len(grads) == len(m) == len(v) == n:
        raise ValueError(f"params, grads, m, v must have equal lengths, got {n}, {len(grads)}, {len(m)}, {len(v)}")
    inputs = {"w": list(params), "g": list(grads), "m": list(m), "v": list(v), "lr": backend.constants(lr, params)}
    env = evaluate(program, backend, inputs)
    xp = backend.xp
    silent = [(g_ == 0) & (m_ == 0) & (v_ == 0) for g_, m_, v_ in zip(grads, m, v)]
    outputs: list[list[Any]] = []
    flags, faults = [], []
    for name in OUTPUTS:
        fixed, output_faults = [], []
        for x, p, quiet in zip(env[name], params, silent):
            x = xp.broadcast_to(backend.cast(x, p), p.shape)
            flags.append(xp.all(xp.isfinite(x)))
            output_faults.append(xp.any(faulty_entries(xp, x, quiet)))
            fixed.append(xp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
        outputs.append(fixed)
        faults.append(xp.any(xp.stack(output_faults)) if output_faults else xp.asarray(False))
    finite = xp.all(xp.stack(flags)) if flags else xp.asarray(True)
    return outputs[0], outputs[1], outputs[2], finite, xp.stack(faults)


class TorchBackend:
    """torch as a backend: constants are 0-dim tensors (one per dtype/device, shared)."""

    xp = torch

    def constants(self, value: Any, likes: Sequence[Any]) -> list[Any]:
        cache: dict[tuple[Any, Any], torch.Tensor] = {}
        out = []
        for like in likes:
            key = dtype, device = like.dtype, like.device
            if key not in cache:
                tensor = torch.as_tensor(value, dtype=dtype, device=device)
                if tensor.numel() != 1:
                    raise ValueError(f"expected a scalar, got a tensor of shape {tuple(tensor.shape)}")
                cache[key] = tensor.detach().reshape(())
            out.append(cache[key])
        return out

    def cast(self, x: Any, like: Any) -> Any:
        return x.to(dtype=like.dtype, device=like.device)


TORCH = TorchBackend()


class ProgramResult(NamedTuple):
    updates: list[torch.Tensor]
    m: list[torch.Tensor]
    v: list[torch.Tensor]
    finite: bool  # every output entry was finite (before the guard replaced the others by 0)
    faulty: tuple[str, ...] = ()  # outputs non-finite by the program's fault (:func:`faulty_entries`)


def run_program(
    program: Program,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    lr: float | torch.Tensor,
) -> ProgramResult:
    """One step of ``program`` for all parameter tensors: the updates (the caller applies ``w = w - update``)
    and the new ``m`` and ``v``. Works in the parameters' dtype and device; inputs are not modified.
    Raises :class:`~metaopt.symbolic.text.ProgramSyntaxError` (a ``ValueError``) for an invalid program."""
    with torch.no_grad():
        updates, new_m, new_v, finite, faulty = run_backend(program, TORCH, params, grads, m, v, lr)
        named = tuple(name for name, bad in zip(OUTPUTS, faulty.tolist()) if bad)
        return ProgramResult(updates, new_m, new_v, bool(finite), named)
