"""Abstract execution of optimizer programs before any training (Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms", Sec. 2.3).

The search spends its compute on training runs, so every child program is first checked without training:

* :func:`infer_types` / :func:`is_valid` -- type inference over the straight-line program. A program is invalid
  when a statement calls an unknown primitive, passes the wrong number of arguments or arguments of the wrong
  types (``norm`` of a scalar, ``dot`` of a scalar, ...), reads a variable before it is defined, or when an
  output (``update``, ``m``, ``v``) is not a tensor at the end. The paper discards such programs before they
  reach a trainer.
* :func:`live_statements` / :func:`prune` -- dependency analysis backwards from the outputs. The paper reports
  that about 70% of the statements of evolved programs do not reach an output; they are kept in the population
  (stepping stones for later mutations) but removed before a program is hashed, trained or shown.
* :func:`training_outputs` / :func:`prune_for_training` -- the same liveness across steps: an ``m`` or ``v``
  that ``update`` never reads (now or in a later step) cannot change training, nor can what only feeds it.
* :func:`functional_hash` -- the paper's functional-equivalence cache: run the program on fixed random inputs
  for a few steps, at two learning rates, and hash the rounded updates and live state, so that renamed,
  reordered or padded programs share one hash while programs that use ``lr`` differently do not.
  :class:`HashCache` maps that hash to a score; the paper reports an 89% hit rate, i.e. most children are
  semantic duplicates that need no training.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from metaopt.symbolic.program import (
    INFIX,
    INPUT_TYPES,
    INPUTS,
    NAMED_CONSTANTS,
    OUTPUTS,
    PRIMITIVES,
    SCALAR,
    TENSOR,
    Const,
    Program,
    Statement,
    Var,
    result_type,
)

__all__ = [
    "HashCache",
    "TypeInfo",
    "format_statement",
    "functional_hash",
    "infer_types",
    "is_valid",
    "live_statements",
    "prune",
    "prune_for_training",
    "reaching_definitions",
    "training_outputs",
]


# ---- statement text (for reasons and reports) --------------------------------------------------------------


def _format_arg(arg: Any) -> str:
    if isinstance(arg, Var):
        return arg.name
    if isinstance(arg, Const):
        return arg.name if arg.name else f"{arg.value:.6g}"
    return repr(arg)


def format_statement(statement: Statement) -> str:
    """``target = a op b`` for the infix operators, ``target = op(a, b, ...)`` otherwise (the text of
    :mod:`metaopt.symbolic.text` when that module is present)."""
    try:
        from metaopt.symbolic.text import format_statement as text_format
    except ImportError:
        text_format = None
    if text_format is not None:
        return text_format(statement)
    args = [_format_arg(a) for a in statement.args]
    if statement.op in INFIX and len(args) == 2:
        return f"{statement.target} = {args[0]} {INFIX[statement.op]} {args[1]}"
    return f"{statement.target} = {statement.op}({', '.join(args)})"


#: Names a statement may not assign: keywords and non-finite literals of the program text.
_RESERVED = frozenset({"def", "return", "inf", "nan"})


# ---- type inference ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TypeInfo:
    """The result of :func:`infer_types`.

    ``valid``: whether the program passes abstract execution. ``reason``: one line naming the offending
    statement (index and text) or output and the problem; empty when valid. ``types``: the type of every
    variable at the point where checking stopped (at the end for a valid program). ``statement_types``: the
    result type of each statement checked so far (a valid program has one per statement). ``index``: the
    offending statement's index, or None (valid, or an output problem).
    """

    valid: bool
    reason: str
    types: dict[str, str]
    statement_types: tuple[str, ...] = ()
    index: int | None = None

    def __bool__(self) -> bool:
        return self.valid


def _invalid(
    index: int | None, statement: Statement | None, problem: str, types: dict[str, str], statement_types: list[str]
) -> TypeInfo:
    where = f"statement {index} ({_safe_format(statement)}): " if index is not None else ""
    return TypeInfo(False, where + problem, dict(types), tuple(statement_types), index)


def _safe_format(statement: Statement | None) -> str:
    try:
        return format_statement(statement)  # type: ignore[arg-type]
    except Exception:  # malformed statement objects still get a reason
        return repr(statement)


def infer_types(program: Program) -> TypeInfo:
    """Abstract execution (paper Sec. 2.3): walk the statements from :data:`INPUT_TYPES`, applying
    :func:`result_type`; stop at the first problem. A variable's type may change when it is reassigned (only
    the outputs' final types are constrained)."""
    types: dict[str, str] = dict(INPUT_TYPES)
    statement_types: list[str] = []
    for index, statement in enumerate(program.statements):
        primitive = PRIMITIVES.get(statement.op)
        if primitive is None:
            return _invalid(index, statement, f"unknown op {statement.op!r}", types, statement_types)
        if not isinstance(statement.target, str) or not statement.target.isidentifier():
            return _invalid(index, statement, f"target {statement.target!r} is not a name", types, statement_types)
        if statement.target in NAMED_CONSTANTS or statement.target in _RESERVED:
            return _invalid(
                index, statement, f"cannot assign to the reserved name {statement.target!r}", types, statement_types
            )
        if len(statement.args) != primitive.arity:
            plural = "argument" if primitive.arity == 1 else "arguments"
            return _invalid(
                index,
                statement,
                f"{statement.op!r} takes {primitive.arity} {plural}, got {len(statement.args)}",
                types,
                statement_types,
            )
        arg_types: list[str] = []
        for arg in statement.args:
            if isinstance(arg, Var):
                if arg.name not in types:
                    return _invalid(
                        index, statement, f"{arg.name!r} is used before it is defined", types, statement_types
                    )
                arg_types.append(types[arg.name])
            elif isinstance(arg, Const):
                if arg.name is not None and arg.name not in NAMED_CONSTANTS:
                    return _invalid(index, statement, f"unknown named constant {arg.name!r}", types, statement_types)
                if not isinstance(arg.value, (int, float)) or not math.isfinite(arg.value):
                    return _invalid(
                        index, statement, f"constant {arg.value!r} is not a finite number", types, statement_types
                    )
                arg_types.append(SCALAR)
            else:
                return _invalid(
                    index, statement, f"argument {arg!r} is neither a variable nor a constant", types, statement_types
                )
        out = result_type(statement.op, arg_types)
        if out is None:
            return _invalid(
                index, statement, f"{statement.op}({', '.join(arg_types)}) is not defined", types, statement_types
            )
        types[statement.target] = out
        statement_types.append(out)
    for name in OUTPUTS:
        if name not in types:
            return _invalid(None, None, f"output {name!r} is never assigned", types, statement_types)
        if types[name] != TENSOR:
            return _invalid(
                None, None, f"output {name!r} is a {types[name]} at the end, not a tensor", types, statement_types
            )
    return TypeInfo(True, "", types, tuple(statement_types), None)


def is_valid(program: Program) -> bool:
    return infer_types(program).valid


# ---- dependency analysis -----------------------------------------------------------------------------------


def reaching_definitions(program: Program) -> list[tuple[int | None, ...]]:
    """For each statement, for each argument: the index of the statement whose assignment the argument reads
    (``-1``: the program input of that name; ``None``: a constant, or a variable not defined yet)."""
    current: dict[str, int] = dict.fromkeys(INPUTS, -1)
    out: list[tuple[int | None, ...]] = []
    for index, statement in enumerate(program.statements):
        out.append(tuple(current.get(a.name) if isinstance(a, Var) else None for a in statement.args))
        current[statement.target] = index
    return out


def _backward_liveness(program: Program, outputs: frozenset[str] | set[str]) -> tuple[list[int], set[str]]:
    """(indices of the statements whose result reaches one of ``outputs`` as they are at the end, ascending;
    the names live at program entry). A statement is live when its target is live right after it; it then
    kills that name (an earlier assignment to the same name is overwritten) and makes its arguments live."""
    live: set[str] = set(outputs)
    keep: list[int] = []
    for index in range(len(program.statements) - 1, -1, -1):
        statement = program.statements[index]
        if statement.target not in live:
            continue
        keep.append(index)
        live.discard(statement.target)
        live.update(a.name for a in statement.args if isinstance(a, Var))
    keep.reverse()
    return keep, live


def live_statements(program: Program, outputs: frozenset[str] | set[str] | tuple[str, ...] = OUTPUTS) -> list[int]:
    """Indices (ascending) of the statements whose result reaches an output (by default ``update``, ``m``,
    ``v`` as they are at the end), by backwards liveness."""
    return _backward_liveness(program, frozenset(outputs))[0]


#: The optimizer state a program carries from one step to the next.
STATE: frozenset[str] = frozenset(OUTPUTS) - {"update"}


def training_outputs(program: Program) -> frozenset[str]:
    """The outputs that can change training: ``update``, plus every state variable (``m``, ``v``) whose
    incoming value is read on the way to ``update``, now or in a later step (a fixpoint over the step loop).

    A program that computes an ``m`` that ``update`` never reads (directly or through ``v``) trains exactly
    like one that leaves ``m`` alone: ``p -= update`` is all training sees. Such state is dead code across
    steps, the part of the paper's redundant statements (Sec. 2.3) that per-step liveness cannot see.
    """
    outputs = frozenset({"update"})
    while True:
        entry = _backward_liveness(program, outputs)[1]
        needed = outputs | (entry & STATE)
        if needed == outputs:
            return outputs
        outputs = needed


def prune_for_training(program: Program) -> Program:
    """The program without the statements that cannot change training (see :func:`training_outputs`); a
    state variable it no longer assigns passes through unchanged. Same updates at every step as ``program``."""
    return _keep(program, live_statements(program, training_outputs(program)))


def _keep(program: Program, keep: list[int]) -> Program:
    """The program with only the statements at ``keep`` (the same object when that is all of them)."""
    if len(keep) == len(program.statements):
        return program
    return Program(tuple(program.statements[i] for i in keep))


def prune(program: Program) -> Program:
    """The program without the statements that do not reach an output (paper Sec. 2.3: ~70% of them)."""
    return _keep(program, live_statements(program))


# ---- functional hash ---------------------------------------------------------------------------------------


def _run_program() -> Callable[..., Any]:
    try:
        from metaopt.symbolic.interpreter import run_program
    except ImportError as err:  # pragma: no cover - only while the interpreter is missing
        raise RuntimeError(f"functional_hash needs metaopt.symbolic.interpreter: {err}") from err
    return run_program


def _canonical(tensor: Any, digits: int) -> bytes:
    """Shape and values rounded to ``digits`` significant digits; non-finite values by name; values below
    1e-9 of the tensor's largest finite magnitude count as 0 (cancellation noise of equal formulas)."""
    import numpy as np

    values = tensor.detach().to("cpu").double().numpy().ravel()
    finite = np.isfinite(values)
    scale = float(np.abs(values[finite]).max()) if finite.any() else 0.0
    floor = 1e-9 * scale
    parts = []
    for x, ok in zip(values.tolist(), finite.tolist()):
        if not ok:
            parts.append("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
        elif abs(x) <= floor or x == 0.0:
            parts.append("0")
        else:
            parts.append(f"{x:.{digits}g}")
    shape = "x".join(str(d) for d in tensor.shape)
    return (f"[{shape}]" + ",".join(parts) + ";").encode()


def functional_hash(
    program: Program,
    *,
    seed: int = 0,
    shapes: tuple[tuple[int, ...], ...] = ((3, 4), (5,)),
    steps: int = 3,
    lrs: float | tuple[float, ...] = (0.01, 0.3),
    digits: int = 6,
) -> str:
    """The paper's functional-equivalence hash (Sec. 2.3): sha256 of what training sees of the program on
    fixed random inputs.

    With a torch generator seeded by ``seed``: float64 parameters ``w`` of the given ``shapes``, initial ``m``
    (normal) and ``v`` (|normal|), and one fresh gradient list per step. The program, reduced by
    :func:`prune_for_training`, runs ``steps`` times through :func:`metaopt.symbolic.interpreter.run_program`,
    feeding ``m``, ``v`` back and applying ``w <- w - update``; every step's ``update``, ``m``, ``v`` (rounded
    to ``digits`` significant digits) and its ``finite`` flag are hashed. The whole run is repeated, from the
    same inputs, at every learning rate in ``lrs``: at one rate, programs that use ``lr`` differently (``lr * g``
    against ``0.01 * g``, ``lr`` against ``100 * lr * lr``) compute the same numbers, but they train
    differently under the proxy's learning-rate sweep, so they must not share a score. Programs that compute the same
    function (renamed temporaries, reordered independent statements, dead statements, ``x * 2`` vs ``x + x``)
    hash equal up to rounding, and so do programs that differ only in state that ``update`` never reads: the
    reduced program passes such state through unchanged, and they train identically.
    Raises ValueError for an invalid program.
    """
    check = infer_types(program)
    if not check.valid:
        raise ValueError(f"invalid program: {check.reason}")
    import torch

    run_program = _run_program()
    program = prune_for_training(program)
    generator = torch.Generator().manual_seed(int(seed))

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float64)

    params = [draw(s) for s in shapes]
    m = [draw(s) for s in shapes]
    v = [draw(s).abs() for s in shapes]
    grads = [[draw(s) for s in shapes] for _ in range(steps)]
    lrs = (float(lrs),) if isinstance(lrs, (int, float)) else tuple(float(lr) for lr in lrs)
    if not lrs:
        raise ValueError("functional_hash needs at least one learning rate")
    digest = hashlib.sha256(f"metaopt.functional_hash/3 {tuple(map(tuple, shapes))} {steps} {lrs!r};".encode())
    initial = (params, m, v)
    for lr in lrs:
        params, m, v = initial
        digest.update(f"lr {lr!r};".encode())
        for step in range(steps):
            result = run_program(
                program,
                [p.clone() for p in params],
                [g.clone() for g in grads[step]],
                [t.clone() for t in m],
                [t.clone() for t in v],
                lr,
            )
            for name, tensors in (("update", result.updates), ("m", result.m), ("v", result.v)):
                digest.update(name.encode())
                for tensor in tensors:
                    digest.update(_canonical(tensor, digits))
            digest.update(b"finite" if result.finite else b"nonfinite")
            params = [p - u.to(p.dtype) for p, u in zip(params, result.updates)]
            m = [t.to(torch.float64) for t in result.m]
            v = [t.to(torch.float64) for t in result.v]
    return digest.hexdigest()


class HashCache:
    """Functional hash -> score, with hit/miss counters (paper Sec. 2.3: 89% of the children are semantic
    duplicates of programs already scored, so their training is skipped).

    Dict-like: ``cache[key] = score``, ``cache[key]``, ``key in cache``, ``len``, iteration over keys. Only
    :meth:`get`, :meth:`lookup` and :meth:`get_or_compute` count hits and misses. :meth:`key` computes (and
    memoises per syntactic program) the functional hash with the cache's hash options.
    """

    def __init__(self, **hash_options: Any) -> None:
        self.hash_options = dict(hash_options)
        self.hits = 0
        self.misses = 0
        self._scores: dict[str, float] = {}
        self._keys: dict[Program, str] = {}

    # dict protocol
    def __getitem__(self, key: str) -> float:
        return self._scores[key]

    def __setitem__(self, key: str, score: float) -> None:
        self._scores[key] = score

    def __contains__(self, key: object) -> bool:
        return key in self._scores

    def __len__(self) -> int:
        return len(self._scores)

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def items(self):
        return self._scores.items()

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._scores:
            self.hits += 1
            return self._scores[key]
        self.misses += 1
        return default

    # programs
    def key(self, program: Program) -> str:
        key = self._keys.get(program)
        if key is None:
            key = functional_hash(program, **self.hash_options)
            self._keys[program] = key
        return key

    def lookup(self, program: Program) -> tuple[str, float | None]:
        """(hash, cached score or None), counting a hit or a miss."""
        key = self.key(program)
        return key, self.get(key)

    def get_or_compute(self, program: Program, score_fn: Callable[[Program], float]) -> float:
        """The cached score of the program's function, else ``score_fn(program)`` stored under its hash."""
        key, score = self.lookup(program)
        if score is None:
            score = score_fn(program)
            self._scores[key] = score
        return score

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict[str, float]:
        return {"entries": len(self._scores), "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate}

    def __repr__(self) -> str:
        return f"HashCache(entries={len(self)}, hits={self.hits}, misses={self.misses})"
