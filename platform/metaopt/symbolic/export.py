"""Export optimizer programs as ordinary optimizers (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms": a discovered program such as Lion, Program 1, is used as a drop-in optimizer).

* :class:`ProgramOptimizer` -- a ``torch.optim.Optimizer`` that runs a program with
  :func:`metaopt.symbolic.interpreter.run_program` over each parameter group (``lr`` lives in the param groups,
  so schedules and PBT can change it; the program is stored in the groups as JSON, so ``state_dict`` restores it).
* :func:`program_optax` -- an ``optax.GradientTransformation`` running the same primitive table
  (:data:`metaopt.symbolic.interpreter.ELEMENTWISE` / :data:`~metaopt.symbolic.interpreter.GLOBAL`) on
  ``jax.numpy``, with ``global_norm`` taken over the whole pytree.

Both keep the interpreter's non-finite guard (non-finite entries become 0) as a safety net for training with
an exported program. The search must not train through that net: inside :func:`raise_on_nonfinite` a
:class:`ProgramOptimizer` step whose program is at fault (:func:`metaopt.symbolic.interpreter.faulty_entries`)
raises :class:`NonFiniteProgramError` instead, and the program scores ``-inf``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from metaopt.symbolic.interpreter import run_backend, run_program
from metaopt.symbolic.program import Program, Var
from metaopt.symbolic.text import check_program, parse_program

__all__ = ["NonFiniteProgramError", "ProgramOptaxState", "ProgramOptimizer", "program_optax", "raise_on_nonfinite"]


def _as_program(program: Program | str) -> Program:
    """A :class:`Program`, its JSON document, or its text."""
    if isinstance(program, Program):
        result = program
    elif isinstance(program, str):
        result = Program.from_json(program) if program.lstrip().startswith("{") else parse_program(program)
    else:
        raise TypeError(f"expected a Program, its JSON or its text, got {type(program).__name__}")
    check_program(result)
    return result


class NonFiniteProgramError(FloatingPointError):
    """A program's outputs were non-finite by its own fault at optimizer step ``step`` (1 = the first step)."""

    def __init__(self, step: int, outputs: tuple[str, ...]):
        self.step = step
        self.outputs = outputs
        super().__init__(f"non-finite {' and '.join(outputs)} at step {step}")


_RAISE_ON_NONFINITE = contextvars.ContextVar("metaopt_raise_on_nonfinite", default=False)


@contextlib.contextmanager
def raise_on_nonfinite() -> Iterator[None]:
    """Within this block :class:`ProgramOptimizer` raises :class:`NonFiniteProgramError` where it would zero a
    faulty output. A context rather than a constructor flag: the search scores programs through tasks that
    build their optimizer from a plain spec (:func:`metaopt.optim.build_optimizer`), out of its reach."""
    token = _RAISE_ON_NONFINITE.set(True)
    try:
        yield
    finally:
        _RAISE_ON_NONFINITE.reset(token)


@functools.lru_cache(maxsize=256)
def _program_from_json(text: str) -> Program:
    return _as_program(text)


class ProgramOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` running an optimizer program: per parameter, state ``m`` and ``v`` (zeros at
    first), and each step ``p -= update``. One :func:`run_program` call per param group, with that group's
    ``lr``; ``group["program"]`` holds the program as JSON (a group may set its own program).

    ``last_finite`` says whether the last step's outputs were all finite (non-finite entries are replaced by
    0 by the interpreter's guard); ``nonfinite_steps`` counts the steps where they were not; ``steps`` counts
    all steps. They travel in :meth:`state_dict` under ``"program_optimizer"``. Inside
    :func:`raise_on_nonfinite` a step whose program is at fault raises :class:`NonFiniteProgramError` before
    touching that group's parameters.
    """

    def __init__(self, params: Iterable[Any], program: Program | str, lr: float | torch.Tensor = 1e-3):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        defaults = {"lr": lr, "program": _as_program(program).to_json()}
        super().__init__(params, defaults)
        self.last_finite = True
        self.nonfinite_steps = 0
        self.steps = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("program") is not None:  # a Program, JSON or text: stored as checked JSON
            param_group = {**param_group, "program": _as_program(param_group["program"]).to_json()}
        super().add_param_group(param_group)

    @property
    def program(self) -> Program:
        """The program of the first param group."""
        return _program_from_json(self.param_groups[0]["program"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        finite = True
        self.steps += 1
        strict = _RAISE_ON_NONFINITE.get()
        for group in self.param_groups:
            params, grads, ms, vs = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ProgramOptimizer does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                ms.append(state["m"])
                vs.append(state["v"])
            if not params:
                continue
            result = run_program(_program_from_json(group["program"]), params, grads, ms, vs, group["lr"])
            if strict and result.faulty:
                raise NonFiniteProgramError(self.steps, result.faulty)
            for p, update, m, v in zip(params, result.updates, result.m, result.v):
                p.sub_(update)
                state = self.state[p]
                state["m"] = m
                state["v"] = v
            finite = finite and result.finite
        self.last_finite = finite
        if not finite:
            self.nonfinite_steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["program_optimizer"] = {
            "last_finite": self.last_finite,
            "nonfinite_steps": self.nonfinite_steps,
            "steps": self.steps,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores state, lr and program of every group (the checkpoint's program replaces this one's)."""
        extra = state_dict.get("program_optimizer", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "program_optimizer"})
        self.last_finite = bool(extra.get("last_finite", True))
        self.nonfinite_steps = int(extra.get("nonfinite_steps", 0))
        self.steps = int(extra.get("steps", 0))


# ---- optax -------------------------------------------------------------------------------------------------


class ProgramOptaxState(NamedTuple):
    count: Any  # int32 step count (the schedule's argument)
    m: Any  # pytree like params
    v: Any  # pytree like params
    nonfinite_steps: Any  # int32: steps whose outputs had non-finite entries (replaced by 0)


class _JaxBackend:
    """jax.numpy as a backend for :func:`metaopt.symbolic.interpreter.run_backend`."""

    def __init__(self) -> None:
        import jax.numpy as jnp

        self.xp = jnp

    def constants(self, value: Any, likes: Sequence[Any]) -> list[Any]:
        return [self.xp.asarray(value, dtype=like.dtype).reshape(()) for like in likes]

    def cast(self, x: Any, like: Any) -> Any:
        return self.xp.asarray(x, dtype=like.dtype)


def program_optax(program: Program | str, learning_rate: float | Callable[[Any], Any]):
    """An ``optax.GradientTransformation`` running ``program`` on every leaf of the params pytree (``update``
    needs ``params`` when the program reads ``w``). ``learning_rate`` is a float or an optax schedule of the step
    count. It returns ``-update`` (optax adds updates; the program's loop subtracts them)."""
    import jax
    import jax.numpy as jnp
    import optax

    program = _as_program(program)
    uses_w = any(isinstance(a, Var) and a.name == "w" for s in program.statements for a in s.args)
    backend = _JaxBackend()

    def init_fn(params: Any) -> ProgramOptaxState:
        return ProgramOptaxState(
            count=jnp.zeros([], jnp.int32),
            m=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(jnp.zeros_like, params),
            nonfinite_steps=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates: Any, state: ProgramOptaxState, params: Any = None) -> tuple[Any, ProgramOptaxState]:
        if params is None:
            if uses_w:
                raise ValueError("this program reads w: pass params to update()")
            params = updates
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        grads, treedef = jax.tree.flatten(updates)
        weights = treedef.flatten_up_to(params)
        ms = treedef.flatten_up_to(state.m)
        vs = treedef.flatten_up_to(state.v)
        new_updates, new_m, new_v, finite, _ = run_backend(program, backend, weights, grads, ms, vs, lr)
        return treedef.unflatten([-u for u in new_updates]), ProgramOptaxState(
            count=optax.safe_increment(state.count),
            m=treedef.unflatten(new_m),
            v=treedef.unflatten(new_v),
            nonfinite_steps=state.nonfinite_steps + jnp.logical_not(finite).astype(jnp.int32),
        )

    return optax.GradientTransformation(init_fn, update_fn)
