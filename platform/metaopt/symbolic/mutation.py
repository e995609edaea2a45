"""Mutations of optimizer programs (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Sec. 2.2).

The search is regularized evolution over programs; a child is its parent with one random mutation:

* :func:`insert` -- a new statement at a random position, its primitive drawn uniformly from
  :data:`~metaopt.symbolic.program.PRIMITIVES`, its arguments drawn from the variables defined at that position or
  new constants (normal N(0, 1) numbers, sometimes a named constant), its target a fresh temporary (``t1``,
  ``t2``, ...) or an existing variable (``update``, ``m`` and ``v`` included);
* :func:`delete` -- remove a random statement;
* :func:`modify` -- change one argument of a random statement: another variable in scope, a new N(0, 1)
  constant, or -- for a constant -- the constant times ``2**a`` with ``a ~ N(0, 1)`` (the paper's rule).

:func:`mutate` picks one of the three with equal weights and re-mutates invalid children (abstract execution,
Sec. 2.3) until the child is valid. Redundant statements are kept: the paper notes they are stepping stones
for later mutations; :func:`metaopt.symbolic.analysis.prune` removes them only for display and hashing.

Every function is pure given its ``numpy.random.Generator``: the same generator state gives the same child.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from metaopt.symbolic.analysis import is_valid
from metaopt.symbolic.program import (
    INPUTS,
    NAMED_CONSTANTS,
    OUTPUTS,
    PRIMITIVES,
    Arg,
    Const,
    Program,
    Statement,
    Var,
)

__all__ = ["KINDS", "Mutated", "MutationConfig", "delete", "insert", "modify", "mutate", "mutate_verbose"]

KINDS: tuple[str, ...] = ("insert", "delete", "modify")
_OPS: tuple[str, ...] = tuple(sorted(PRIMITIVES))
_NAMED: tuple[str, ...] = tuple(sorted(NAMED_CONSTANTS))
_TEMP = re.compile(r"t(\d+)\Z")


@dataclass(frozen=True)
class MutationConfig:
    """Probabilities of the random choices (the defaults are this project's; the paper gives none).

    ``const_prob``: an inserted argument is a new constant rather than a variable. ``named_const_prob``: a new
    constant is a named one (pi, e, eps) rather than a N(0, 1) number. ``new_temp_prob``: an inserted statement
    assigns a fresh temporary rather than an existing variable. For :func:`modify` of a constant argument:
    ``scale_const_prob`` multiplies it by 2**a, ``new_const_prob`` replaces it by a new constant, the rest by a
    variable; of a variable argument: ``var_to_const_prob`` replaces it by a new constant, the rest by another
    variable. ``weights``: relative weights of insert, delete, modify in :func:`mutate`. ``max_statements``:
    an insert that would exceed it is refused (None: no limit). ``max_chain``: :func:`mutate` re-mutates an
    invalid child at most this many times before starting again from the parent.
    """

    const_prob: float = 0.2
    named_const_prob: float = 0.1
    new_temp_prob: float = 0.5
    scale_const_prob: float = 0.5
    new_const_prob: float = 0.25
    var_to_const_prob: float = 0.2
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    max_statements: int | None = None
    max_chain: int = 3


DEFAULT_CONFIG = MutationConfig()


class Mutated(NamedTuple):
    """A valid child, the kinds of the mutations applied to get it (more than one when invalid intermediate
    children were re-mutated) and the number of tries used."""

    program: Program
    kinds: tuple[str, ...]
    tries: int


# ---- helpers -----------------------------------------------------------------------------------------------


def _scope(program: Program, position: int) -> list[str]:
    """Variables defined before statement ``position``: the inputs, then earlier targets (first-seen order)."""
    names = list(INPUTS)
    seen = set(names)
    for statement in program.statements[:position]:
        if statement.target not in seen:
            seen.add(statement.target)
            names.append(statement.target)
    return names


def _fresh_temp(program: Program) -> str:
    used = set(INPUTS) | set(OUTPUTS)
    for statement in program.statements:
        used.add(statement.target)
        used.update(a.name for a in statement.args if isinstance(a, Var))
    k = 1
    while f"t{k}" in used:
        k += 1
    return f"t{k}"


def _new_constant(rng: np.random.Generator, config: MutationConfig) -> Const:
    if rng.random() < config.named_const_prob:
        name = _NAMED[int(rng.integers(len(_NAMED)))]
        return Const(NAMED_CONSTANTS[name], name)
    return Const(float(rng.standard_normal()))


def _pick(rng: np.random.Generator, items: list[str] | tuple[str, ...]) -> str:
    return items[int(rng.integers(len(items)))]


def _random_arg(rng: np.random.Generator, scope: list[str], config: MutationConfig) -> Arg:
    if rng.random() < config.const_prob:
        return _new_constant(rng, config)
    return Var(_pick(rng, scope))


# ---- the three mutations -----------------------------------------------------------------------------------


def insert(program: Program, rng: np.random.Generator, config: MutationConfig = DEFAULT_CONFIG) -> Program:
    """A random statement at a random position (0 .. len): uniform primitive, arguments from the variables in
    scope there or new constants, target a fresh ``tN`` or an existing variable (``update`` included)."""
    if config.max_statements is not None and len(program) >= config.max_statements:
        raise ValueError(f"the program already has {len(program)} statements (max_statements)")
    position = int(rng.integers(len(program) + 1))
    scope = _scope(program, position)
    op = _pick(rng, _OPS)
    args = tuple(_random_arg(rng, scope, config) for _ in range(PRIMITIVES[op].arity))
    if rng.random() < config.new_temp_prob:
        target = _fresh_temp(program)
    else:
        targets = scope + [name for name in OUTPUTS if name not in scope]
        target = _pick(rng, targets)
    statements = list(program.statements)
    statements.insert(position, Statement(target, op, args))
    return Program(tuple(statements))


def delete(program: Program, rng: np.random.Generator, config: MutationConfig = DEFAULT_CONFIG) -> Program:
    """The program without one uniformly chosen statement."""
    if not program.statements:
        raise ValueError("cannot delete from an empty program")
    index = int(rng.integers(len(program)))
    return Program(program.statements[:index] + program.statements[index + 1 :])


def modify(program: Program, rng: np.random.Generator, config: MutationConfig = DEFAULT_CONFIG) -> Program:
    """One argument of one random statement changed. A constant is multiplied by ``2**a``, ``a ~ N(0, 1)``
    (a named constant becomes the scaled number), or replaced by a new constant or a variable in scope; a
    variable is replaced by another variable in scope or by a new constant."""
    if not program.statements:
        raise ValueError("cannot modify an empty program")
    index = int(rng.integers(len(program)))
    statement = program.statements[index]
    if not statement.args:
        raise ValueError(f"statement {index} has no arguments")
    position = int(rng.integers(len(statement.args)))
    old = statement.args[position]
    scope = _scope(program, index)
    new: Arg
    if isinstance(old, Const):
        u = rng.random()
        if u < config.scale_const_prob:
            new = Const(float(old.value) * float(2.0 ** rng.standard_normal()))
        elif u < config.scale_const_prob + config.new_const_prob:
            new = _new_constant(rng, config)
        else:
            new = Var(_pick(rng, scope))
    else:
        others = [name for name in scope if name != getattr(old, "name", None)]
        if rng.random() < config.var_to_const_prob or not others:
            new = _new_constant(rng, config)
        else:
            new = Var(_pick(rng, others))
    args = (*statement.args[:position], new, *statement.args[position + 1 :])
    statements = list(program.statements)
    statements[index] = Statement(statement.target, statement.op, args)
    return Program(tuple(statements))


_MUTATIONS = {"insert": insert, "delete": delete, "modify": modify}


def _one(program: Program, rng: np.random.Generator, config: MutationConfig) -> tuple[Program | None, str]:
    weights = np.asarray(config.weights, dtype=float)
    kind = KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]
    try:
        return _MUTATIONS[kind](program, rng, config), kind
    except ValueError:  # e.g. delete from an empty program: this try is spent
        return None, kind


def mutate_verbose(
    program: Program, rng: np.random.Generator, max_tries: int = 50, config: MutationConfig = DEFAULT_CONFIG
) -> Mutated:
    """Like :func:`mutate`, also returning the kinds applied and the tries used."""
    candidate, kinds, chain = program, [], 0
    for tries in range(1, max_tries + 1):
        if chain >= config.max_chain:  # this line of re-mutations is not converging: start from the parent
            candidate, kinds, chain = program, [], 0
        child, kind = _one(candidate, rng, config)
        if child is None:
            continue
        kinds.append(kind)
        chain += 1
        if child != program and is_valid(child):
            return Mutated(child, tuple(kinds), tries)
        candidate = child  # the paper re-mutates invalid (and unchanged) children
    raise RuntimeError(f"no valid mutation of the program in {max_tries} tries")


def mutate(
    program: Program, rng: np.random.Generator, max_tries: int = 50, config: MutationConfig = DEFAULT_CONFIG
) -> Program:
    """A valid child of ``program``: insert, delete or modify (equal weights), re-mutating invalid children
    (and children identical to the parent) up to ``max_tries`` mutations in all; raises RuntimeError when none
    is valid. Dead statements are kept (stepping stones, paper Sec. 2.2)."""
    return mutate_verbose(program, rng, max_tries, config).program
