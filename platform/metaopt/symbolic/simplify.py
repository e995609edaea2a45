"""Simplification of discovered programs (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
Sec. 2.4 and Appendix).

Evolved programs are long and cluttered; the paper simplifies the ones it keeps by removing redundant
statements, applying algebraic identities and, with the task score in the loop, removing statements that do not
matter. :func:`simplify` does the same in three steps:

1. **prune** -- dependency analysis (:func:`metaopt.symbolic.analysis.prune`): statements that do not reach an
   output are dropped.
2. **rewrite** -- semantics-preserving rewrites until none applies (each followed by a prune):

   * ``x / sqrt(square(x))`` (also ``x / sqrt(x * x)``, ``x / sqrt(x ** 2)``, ``x / abs(x)``) -> ``sign(x)``;
   * identities -> a copy of the argument: ``x * 1``, ``x + 0``, ``x - 0``, ``x / 1``, ``x ** 1``,
     ``interp(x, y, 0)`` (-> x), ``interp(x, y, 1)`` (-> y), ``interp(x, x, c)`` (constant c), ``max(x, x)``,
     ``min(x, x)``;
   * ``negative(negative(x))`` -> ``x``; ``abs(abs(x))``, ``sign(sign(x))`` -> the inner result;
   * nested interpolations with constant weights: with ``interp(x, y, a) = (1 - a) x + a y``,
     ``interp(interp(a, b, c1), b, c2) = (1 - c1)(1 - c2) a + (1 - (1 - c1)(1 - c2)) b``, i.e.
     ``interp(a, b, 1 - (1 - c1)(1 - c2))``; and ``interp(a, interp(a, b, c1), c2) = interp(a, b, c1 c2)``;
   * constant chains ``(x * c1) * c2`` -> ``x * (c1 c2)``;
   * constant folding: a statement whose arguments are all constants is evaluated (by the interpreter) and its
     uses read the number.

   A "copy" ``t = x`` has no primitive of its own: later reads of ``t`` read ``x`` instead when ``x`` still
   holds the same value there, or, when ``t`` is an output, ``t`` is assigned ``x``'s defining computation;
   otherwise the rewrite is not applied. The identities hold for finite values (``interp(x, y, 0)`` is nan,
   not x, where y is inf); with ``verify`` (default) a rewrite is only kept when the functional hash
   (:func:`metaopt.symbolic.analysis.functional_hash`) is unchanged.
3. **score-based removal** (only with ``score_fn``) -- greedily try deleting each statement, or replacing it by
   a copy of one of its arguments; keep the change when the program stays valid, gets shorter after pruning
   and ``score_fn(candidate) >= score_fn(current) - tolerance`` (``score_fn`` is called once per functional
   hash). Then step 2 runs again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from metaopt.symbolic.analysis import format_statement, functional_hash, infer_types, is_valid, prune
from metaopt.symbolic.program import (
    INPUT_TYPES,
    INPUTS,
    OUTPUTS,
    PRIMITIVES,
    SCALAR,
    Arg,
    Const,
    Program,
    Statement,
    Var,
)

__all__ = ["SimplifyReport", "format_side_by_side", "replace_with_copy", "rewrite", "simplify"]

_MAX_REWRITES = 1000


# ---- report ------------------------------------------------------------------------------------------------


def _program_text(program: Program) -> str:
    try:
        from metaopt.symbolic.text import format_program
    except ImportError:
        format_program = None
    if format_program is not None:
        return format_program(program)
    lines = ["def train(" + ", ".join(INPUTS) + "):"]
    lines += ["    " + format_statement(s) for s in program.statements]
    lines.append("    return " + ", ".join(OUTPUTS))
    return "\n".join(lines)


def format_side_by_side(before: Program, after: Program, titles: tuple[str, str] = ("before", "after")) -> str:
    left = [titles[0], *_program_text(before).splitlines()]
    right = [titles[1], *_program_text(after).splitlines()]
    width = max(len(line) for line in left)
    rows = max(len(left), len(right))
    left += [""] * (rows - len(left))
    right += [""] * (rows - len(right))
    return "\n".join(f"{a.ljust(width)}  |  {b}".rstrip() for a, b in zip(left, right))


@dataclass
class SimplifyReport:
    """``before`` and ``after`` programs and the ``steps`` applied, one human-readable line each."""

    before: Program
    after: Program
    steps: list[str] = field(default_factory=list)

    def format(self) -> str:
        text = format_side_by_side(self.before, self.after)
        body = "\n".join(f"  {i + 1}. {step}" for i, step in enumerate(self.steps)) or "  (none)"
        return f"{text}\n\n{len(self.before)} -> {len(self.after)} statements; steps:\n{body}"


# ---- data flow ---------------------------------------------------------------------------------------------


class _Flow:
    """Reaching definitions and types of one valid program."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.statements = program.statements
        env = dict.fromkeys(INPUTS, -1)
        self.env: list[dict[str, int]] = []  # env[i]: name -> defining statement (-1 input) before statement i
        for index, statement in enumerate(self.statements):
            self.env.append(dict(env))
            env[statement.target] = index
        self.env.append(dict(env))  # after the last statement
        self.types = infer_types(program).statement_types

    def def_of(self, index: int, name: str) -> int | None:
        return self.env[index].get(name)

    def producer(self, index: int, arg: Arg) -> tuple[int, Statement] | None:
        """The statement computing the value ``arg`` reads at statement ``index``."""
        if not isinstance(arg, Var):
            return None
        d = self.def_of(index, arg.name)
        if d is None or d < 0:
            return None
        return d, self.statements[d]

    def arg_type(self, index: int, arg: Arg) -> str:
        if isinstance(arg, Const):
            return SCALAR
        d = self.def_of(index, arg.name)
        return INPUT_TYPES[arg.name] if d == -1 else self.types[d]

    def same(self, i: int, a: Arg, k: int, b: Arg) -> bool:
        """``a`` read at statement ``i`` and ``b`` read at statement ``k`` are the same value."""
        if isinstance(a, Const) and isinstance(b, Const):
            return float(a.value) == float(b.value)
        if isinstance(a, Var) and isinstance(b, Var):
            return a.name == b.name and self.def_of(i, a.name) == self.def_of(k, b.name)
        return False

    def available(self, arg: Arg, at: int, to: int) -> bool:
        """``arg`` as read at statement ``at`` still holds that value at statement ``to`` (``len``: the end)."""
        return isinstance(arg, Const) or self.def_of(at, arg.name) == self.def_of(to, arg.name)

    def uses(self, index: int) -> list[tuple[int, int]]:
        """(statement, argument position) of every read of statement ``index``'s assignment."""
        target = self.statements[index].target
        out = []
        for k in range(index + 1, len(self.statements)):
            for j, arg in enumerate(self.statements[k].args):
                if isinstance(arg, Var) and arg.name == target and self.def_of(k, target) == index:
                    out.append((k, j))
        return out

    def live_out(self, index: int) -> bool:
        target = self.statements[index].target
        return target in OUTPUTS and self.env[-1].get(target) == index


def _replace(statements: tuple[Statement, ...], index: int, statement: Statement | None) -> Program:
    if statement is None:
        return Program(statements[:index] + statements[index + 1 :])
    return Program((*statements[:index], statement, *statements[index + 1 :]))


def _copy(flow: _Flow, index: int, src: Arg) -> Program | None:
    """Statement ``index`` turned into the copy ``target = src``, expressed without a copy primitive."""
    statements = flow.statements
    statement = statements[index]
    target = statement.target
    if isinstance(src, Var) and src.name == target:  # t = t: nothing changes
        return _replace(statements, index, None)
    if not flow.live_out(index):
        uses = flow.uses(index)
        if all(flow.available(src, index, k) for k, _ in uses):
            new = list(statements)
            for k, j in uses:
                s = new[k]
                new[k] = Statement(s.target, s.op, (*s.args[:j], src, *s.args[j + 1 :]))
            return _replace(tuple(new), index, None)
    produced = flow.producer(index, src)
    if produced is not None:  # recompute src's value under the target's name
        d, source = produced
        if all(flow.available(a, d, index) for a in source.args):
            return _replace(statements, index, Statement(target, source.op, source.args))
    return None


def replace_with_copy(program: Program, index: int, src: Arg) -> Program | None:
    """``program`` with statement ``index`` replaced by ``target = src`` (propagated to the reads, or the
    computation of ``src`` repeated under the target's name); None when that cannot be expressed."""
    if not is_valid(program):
        raise ValueError(f"invalid program: {infer_types(program).reason}")
    return _copy(_Flow(program), index, src)


# ---- rewrite rules -----------------------------------------------------------------------------------------
# Each rule: (flow, index) -> (program, description) or None.


def _const(arg: Arg, value: float | None = None) -> bool:
    return isinstance(arg, Const) and (value is None or float(arg.value) == value)


def _copy_rule(flow: _Flow, index: int, src: Arg, why: str) -> tuple[Program, str] | None:
    if flow.arg_type(index, src) != flow.types[index]:  # a copy must not change the type (no broadcasting)
        return None
    program = _copy(flow, index, src)
    if program is None:
        return None
    return program, f"{why}: {format_statement(flow.statements[index])} is a copy of {_arg_text(src)}"


def _arg_text(arg: Arg) -> str:
    return arg.name if isinstance(arg, Var) else (arg.name or f"{float(arg.value):.6g}")


def _rule_identity(flow: _Flow, index: int):
    s = flow.statements[index]
    a = s.args
    src = None
    if s.op == "add" and _const(a[1], 0.0):
        src = a[0]
    elif s.op == "add" and _const(a[0], 0.0):
        src = a[1]
    elif (s.op == "sub" and _const(a[1], 0.0)) or (s.op == "mul" and _const(a[1], 1.0)):
        src = a[0]
    elif s.op == "mul" and _const(a[0], 1.0):
        src = a[1]
    elif (s.op in ("div", "power") and _const(a[1], 1.0)) or (s.op == "interp" and _const(a[2], 0.0)):
        src = a[0]
    elif s.op == "interp" and _const(a[2], 1.0):
        src = a[1]
    elif s.op == "interp" and _const(a[2]) and flow.same(index, a[0], index, a[1]):
        src = a[0]  # a constant weight only: interp(x, x, inf) is nan
    elif s.op in ("max", "min") and flow.same(index, a[0], index, a[1]):
        src = a[0]
    if src is None:
        return None
    return _copy_rule(flow, index, src, "identity")


def _rule_involution(flow: _Flow, index: int):
    """negative(negative(x)) -> x; abs(abs(x)) and sign(sign(x)) -> the inner result."""
    s = flow.statements[index]
    if s.op not in ("negative", "abs", "sign"):
        return None
    produced = flow.producer(index, s.args[0])
    if produced is None or produced[1].op != s.op:
        return None
    d, inner = produced
    if s.op == "negative":
        if not flow.available(inner.args[0], d, index):
            return None
        return _copy_rule(flow, index, inner.args[0], "negative(negative(x)) = x")
    return _copy_rule(flow, index, s.args[0], f"{s.op}({s.op}(x)) = {s.op}(x)")


def _rule_sign(flow: _Flow, index: int):
    """x / sqrt(square(x)) = x / |x| = sign(x) (also x * x, x ** 2 under the sqrt, or x / abs(x))."""
    s = flow.statements[index]
    if s.op != "div":
        return None
    x, denominator = s.args
    produced = flow.producer(index, denominator)
    if produced is None:
        return None
    d, den = produced
    magnitude_of = None  # the argument whose |.| the denominator is
    if den.op == "abs":
        magnitude_of = (d, den.args[0])
    elif den.op == "sqrt":
        inner = flow.producer(d, den.args[0])
        if inner is not None:
            q, sq = inner
            if (
                sq.op == "square"
                or (sq.op == "mul" and flow.same(q, sq.args[0], q, sq.args[1]))
                or (sq.op == "power" and _const(sq.args[1], 2.0))
            ):
                magnitude_of = (q, sq.args[0])
    if magnitude_of is None or not flow.same(index, x, *magnitude_of):
        return None
    new = Statement(s.target, "sign", (x,))
    program = _replace(flow.statements, index, new)
    return program, f"x / |x| = sign(x): {format_statement(s)} -> {format_statement(new)}"


def _rule_nested_interp(flow: _Flow, index: int):
    s = flow.statements[index]
    if s.op != "interp" or not _const(s.args[2]):
        return None
    c2 = float(s.args[2].value)
    first, second = s.args[0], s.args[1]
    produced = flow.producer(index, first)
    if produced is not None and produced[1].op == "interp" and _const(produced[1].args[2]):
        d, inner = produced
        a, b, c1 = inner.args[0], inner.args[1], float(inner.args[2].value)
        if flow.same(d, b, index, second) and flow.available(a, d, index):
            c = 1.0 - (1.0 - c1) * (1.0 - c2)
            new = Statement(s.target, "interp", (a, second, Const(c)))
            return (
                _replace(flow.statements, index, new),
                f"interp(interp(a, b, c1), b, c2) = interp(a, b, 1 - (1 - c1)(1 - c2)): "
                f"{format_statement(s)} -> {format_statement(new)}",
            )
    produced = flow.producer(index, second)
    if produced is not None and produced[1].op == "interp" and _const(produced[1].args[2]):
        d, inner = produced
        a, b, c1 = inner.args[0], inner.args[1], float(inner.args[2].value)
        if flow.same(d, a, index, first) and flow.available(b, d, index):
            new = Statement(s.target, "interp", (first, b, Const(c1 * c2)))
            return (
                _replace(flow.statements, index, new),
                f"interp(a, interp(a, b, c1), c2) = interp(a, b, c1 c2): "
                f"{format_statement(s)} -> {format_statement(new)}",
            )
    return None


def _rule_mul_chain(flow: _Flow, index: int):
    """(x * c1) * c2 -> x * (c1 c2), constants on either side."""
    s = flow.statements[index]
    if s.op != "mul":
        return None
    for z_pos in (0, 1):
        z, c2 = s.args[z_pos], s.args[1 - z_pos]
        if not _const(c2):
            continue
        produced = flow.producer(index, z)
        if produced is None or produced[1].op != "mul":
            continue
        d, inner = produced
        for x_pos in (0, 1):
            x, c1 = inner.args[x_pos], inner.args[1 - x_pos]
            if _const(c1) and not _const(x) and flow.available(x, d, index):
                new = Statement(s.target, "mul", (x, Const(float(c1.value) * float(c2.value))))
                return (
                    _replace(flow.statements, index, new),
                    f"(x * c1) * c2 = x * (c1 c2): {format_statement(s)} -> {format_statement(new)}",
                )
    return None


def _evaluate_constant(statement: Statement) -> float | None:
    """The value of a statement on constants only, as the interpreter computes it (None: not finite)."""
    import torch

    from metaopt.symbolic.interpreter import run_program

    probe = Program((Statement("t", statement.op, statement.args), Statement("update", "add", (Var("w"), Var("t")))))

    def zeros() -> list[torch.Tensor]:
        return [torch.zeros(1, dtype=torch.float64)]

    result = run_program(probe, zeros(), zeros(), zeros(), zeros(), 0.0)
    if not result.finite:
        return None
    value = float(result.updates[0].reshape(-1)[0])
    return value


def _rule_fold(flow: _Flow, index: int):
    s = flow.statements[index]
    if not s.args or not all(isinstance(a, Const) for a in s.args) or PRIMITIVES[s.op].arity != len(s.args):
        return None
    value = _evaluate_constant(s)
    if value is None:
        return None
    program = _copy(flow, index, Const(value))
    if program is None:
        return None
    return program, f"constant folding: {format_statement(s)} -> {value:.6g}"


RULES = (_rule_sign, _rule_nested_interp, _rule_involution, _rule_identity, _rule_mul_chain, _rule_fold)


def rewrite(program: Program, *, verify: bool = True) -> tuple[Program, list[str]]:
    """Step 2 of :func:`simplify`: apply the rewrite rules (each followed by a prune) until none applies.
    With ``verify``, a rewrite that changes the functional hash is skipped. Returns the program and one
    description per applied rewrite."""
    steps: list[str] = []
    reference = functional_hash(program) if verify else None
    rejected: set[tuple[Program, int, int]] = set()
    for _ in range(_MAX_REWRITES):
        flow = _Flow(program)
        applied = False
        for index in range(len(program.statements)):
            for r, rule in enumerate(RULES):
                if (program, index, r) in rejected:
                    continue
                found = rule(flow, index)
                if found is None:
                    continue
                candidate, description = prune(found[0]), found[1]
                if candidate == program or not is_valid(candidate):
                    rejected.add((program, index, r))
                    continue
                if verify and functional_hash(candidate) != reference:
                    rejected.add((program, index, r))
                    continue
                steps.append(f"rewrite statement {index}, {description}")
                program, applied = candidate, True
                break
            if applied:
                break
        if not applied:
            break
    return program, steps


# ---- score-based removal -----------------------------------------------------------------------------------


def _removal_candidates(program: Program):
    flow = _Flow(program)
    for index, statement in enumerate(program.statements):
        yield _replace(program.statements, index, None), f"remove {format_statement(statement)}"
        seen: list[Arg] = []
        for arg in statement.args:
            if arg in seen:
                continue
            seen.append(arg)
            copied = _copy(flow, index, arg)
            if copied is not None:
                yield copied, f"replace {format_statement(statement)} by {statement.target} = {_arg_text(arg)}"


def _score_removals(
    program: Program, score_fn: Callable[[Program], float], tolerance: float, steps: list[str]
) -> Program:
    scores: dict[str, float] = {}  # by functional hash: candidates computing the same function are scored once

    def score(p: Program) -> float:
        key = functional_hash(p)
        if key not in scores:
            scores[key] = float(score_fn(p))
        return scores[key]

    current = program
    improved = True
    while improved:
        improved = False
        base = score(current)
        for candidate, description in _removal_candidates(current):
            candidate = prune(candidate)
            if len(candidate) >= len(current) or not is_valid(candidate):
                continue
            value = score(candidate)
            if value >= base - tolerance:
                steps.append(
                    f"score-based: {description} (score {base:.6g} -> {value:.6g}, "
                    f"{len(current)} -> {len(candidate)} statements)"
                )
                current, improved = candidate, True
                break
    return current


# ---- entry point -------------------------------------------------------------------------------------------


def simplify(
    program: Program, score_fn: Callable[[Program], float] | None = None, tolerance: float = 0.0, *, verify: bool = True
) -> SimplifyReport:
    """Simplify a valid program (paper Sec. 2.4): prune, semantics-preserving rewrites, then -- with
    ``score_fn`` -- greedy removals whose score stays within ``tolerance`` of the current program's. Each
    accepted removal moves the reference, so removals may lose up to ``tolerance`` each. Raises ValueError for
    an invalid program."""
    check = infer_types(program)
    if not check.valid:
        raise ValueError(f"invalid program: {check.reason}")
    steps: list[str] = []
    current = prune(program)
    if len(current) < len(program):
        steps.append(
            f"prune: removed {len(program) - len(current)} statements that reach no output "
            f"({len(program)} -> {len(current)})"
        )
    current, rewrites = rewrite(current, verify=verify)
    steps += rewrites
    if score_fn is not None:
        current = _score_removals(current, score_fn, tolerance, steps)
        current, rewrites = rewrite(current, verify=verify)
        steps += rewrites
    return SimplifyReport(program, current, steps)
