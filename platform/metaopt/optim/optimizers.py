"""Optimizers from a spec dict, for torch and for optax, with the learning rate kept mutable.

A spec names the optimizer and, optionally, its hyperparameters::

    {"name": "adamw", "lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}

=========  =================================================================================
``sgd``    ``momentum`` 0.9, ``nesterov`` False, ``weight_decay`` 0.0 (L2 added to the grad)
``adamw``  ``betas`` (0.9, 0.999), ``eps`` 1e-8, ``weight_decay`` 0.01 (decoupled)
``lion``   ``betas`` (0.9, 0.99), ``weight_decay`` 0.0 (decoupled)
``program`` ``program``: an optimizer program (:mod:`metaopt.symbolic`) as program text, its JSON,
           a file holding either, or ``adamw`` / ``lion``; ``lr`` 1.0 (programs scale it themselves)
=========  =================================================================================

``lr`` defaults to 1e-3 for all. Both builders read the same spec through
:func:`resolve_optimizer_spec`, so the torch and optax versions of one spec run the same
algorithm with the same hyperparameters (the tests check them step by step).

Outer loops (PBT, schedule replay) change the learning rate between steps without
rebuilding the optimizer, which would lose its moments: in torch with
:func:`set_learning_rate`, in optax through ``optax.inject_hyperparams``, which keeps
``learning_rate`` in ``state.hyperparams`` (see :func:`set_optax_learning_rate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from metaopt.config import quote
from metaopt.errors import ConfigError
from metaopt.optim.schedules import (
    check_choice,
    check_keys,
    check_lr,
    check_mapping,
    check_real,
)

__all__ = [
    "OPTIMIZER_NAMES",
    "build_optax",
    "build_optimizer",
    "resolve_optimizer_spec",
    "set_learning_rate",
    "set_optax_learning_rate",
]

OPTIMIZER_NAMES = ("sgd", "adamw", "lion", "program")

# Defaults per optimizer; the keys are also the only hyperparameters a spec may set.
# SGD/AdamW follow torch.optim; Lion follows Chen et al. 2023 (betas 0.9/0.99).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    "lion": {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0},
    "program": {"lr": 1.0, "program": None},
}


def _check_unit(field: str, value: Any) -> float:
    # Momentum-like coefficients: 1 would never forget, so the range is open at 1.
    return check_real(field, value, low=0.0, high=1.0, high_open=True)


def _check_betas(field: str, value: Any) -> tuple[float, float]:
    pair = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else ()
    try:
        if len(pair) == 2:
            return (_check_unit(field, pair[0]), _check_unit(field, pair[1]))
    except ConfigError:
        pass  # reported below with the whole pair, which is what the user wrote
    raise ConfigError(field, f"must be a pair [beta1, beta2], each in [0, 1), got {quote(value)}")


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, f"must be true or false, got {quote(value)}")
    return value


_CHECKS = {
    "lr": check_lr,
    "momentum": _check_unit,
    "nesterov": _check_bool,
    "weight_decay": lambda field, value: check_real(field, value, low=0.0),
    "eps": lambda field, value: check_real(field, value, low=0.0, low_open=True),
    "betas": _check_betas,
    "program": lambda field, value: _check_program(field, value),
}


def _check_program(field: str, value: Any) -> str:
    """Any accepted program form -> its canonical JSON (so a spec stays plain data for Tune and MLflow)."""
    from metaopt.symbolic.search import load_start_program

    if value is None:
        raise ConfigError(field, "missing; give program text, its JSON, a file, or adamw / lion")
    try:
        return load_start_program(value).to_json()
    except ConfigError as err:
        raise ConfigError(field, err.problem) from None


def resolve_optimizer_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an optimizer spec and fill in defaults: ``{"name": ..., <every hyperparameter>}``.

    Raises ConfigError naming ``optimizer.<key>`` for an unknown name or key, or a value
    outside its range (lr > 0; momentum and betas in [0, 1); eps > 0; weight_decay >= 0).
    """
    spec = check_mapping("optimizer", spec)
    name = check_choice("optimizer.name", spec.get("name"), OPTIMIZER_NAMES)
    defaults = _DEFAULTS[name]
    check_keys("optimizer", spec, ("name", *defaults), owner=f"optimizer {quote(name)}")
    resolved = {
        key: _CHECKS[key](f"optimizer.{key}", spec.get(key, default))
        for key, default in defaults.items()
    }
    if resolved.get("nesterov") and resolved["momentum"] == 0.0:
        # Nesterov's look-ahead is defined through the momentum buffer; torch refuses it too.
        raise ConfigError(
            "optimizer.nesterov", "true needs optimizer.momentum in (0, 1), got momentum 0"
        )
    return {"name": name, **resolved}


def _torch_lion(params: Any, **hyperparams: Any) -> torch.optim.Optimizer:
    """Lion: Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms".

    The implementation is ``pytorch_optimizer.Lion``; its decoupled weight decay
    (``p *= 1 - lr * wd``) matches the paper and ``optax.lion``.
    """
    # Imported here: pytorch_optimizer costs ~2 s at import, paid only by Lion users.
    from pytorch_optimizer import Lion

    return Lion(params, **hyperparams)


def _torch_program(params: Any, lr: float, program: str) -> torch.optim.Optimizer:
    """A discovered (or hand-written) optimizer program as a torch optimizer (:mod:`metaopt.symbolic.export`)."""
    from metaopt.symbolic.export import ProgramOptimizer
    from metaopt.symbolic.program import Program

    return ProgramOptimizer(params, Program.from_json(program), lr=lr)


# The resolved spec's keys are exactly these constructors' keyword arguments.
_TORCH_FACTORIES = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,  # Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"
    "lion": _torch_lion,
    "program": _torch_program,
}


def build_optimizer(params: Any, spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    """A torch optimizer over ``params`` (tensors or param groups) as ``spec`` describes.

    SGD and AdamW are ``torch.optim``'s; Lion is ``pytorch_optimizer.Lion``.
    """
    hyperparams = resolve_optimizer_spec(spec)
    name = hyperparams.pop("name")
    return _TORCH_FACTORIES[name](params, **hyperparams)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every param group, keeping the optimizer's state (moments, step).

    ``lr`` may be 0 (a schedule's ``end_lr``) but not negative or non-finite. Per-group
    learning rates are overwritten: one outer loop owns the learning rate.
    """
    lr = check_real("lr", lr, low=0.0)
    for group in optimizer.param_groups:
        group["lr"] = lr


def _optax_sgd(learning_rate: Any, momentum: Any, nesterov: bool, weight_decay: Any) -> Any:
    """``torch.optim.SGD`` in optax: L2 decay is added to the gradient *before* momentum."""
    import optax

    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def _optax_kwargs(hyperparams: dict[str, Any]) -> dict[str, Any]:
    # optax spells lr "learning_rate" and splits betas into b1/b2.
    kwargs = dict(hyperparams)
    kwargs["learning_rate"] = kwargs.pop("lr")
    if "betas" in kwargs:
        kwargs["b1"], kwargs["b2"] = kwargs.pop("betas")
    return kwargs


def build_optax(spec: Mapping[str, Any]) -> Any:
    """The optax ``GradientTransformation`` for ``spec``, with its hyperparameters in its state.

    Wrapped in ``optax.inject_hyperparams``, so ``state.hyperparams["learning_rate"]``
    (and the other numeric hyperparameters) can be changed between updates; pass
    ``params`` to ``update`` since weight decay reads them. ``weight_decay`` is always set
    explicitly, because optax's own defaults (adamw 1e-4, lion 1e-3) differ from torch's.
    """
    # Imported here: torch-only workers need not pay for importing jax.
    import optax

    hyperparams = resolve_optimizer_spec(spec)
    name = hyperparams.pop("name")
    if name == "program":
        from metaopt.symbolic.export import program_optax
        from metaopt.symbolic.program import Program

        program = Program.from_json(hyperparams.pop("program"))
        return optax.inject_hyperparams(lambda learning_rate: program_optax(program, learning_rate))(
            learning_rate=hyperparams["lr"]
        )
    factory = {"sgd": _optax_sgd, "adamw": optax.adamw, "lion": optax.lion}[name]
    return optax.inject_hyperparams(factory)(**_optax_kwargs(hyperparams))


def set_optax_learning_rate(opt_state: Any, lr: float) -> Any:
    """A copy of a :func:`build_optax` state whose next update uses ``lr``.

    Keeps the stored dtype, so a jitted update function is not recompiled.
    """
    import jax.numpy as jnp

    lr = check_real("lr", lr, low=0.0)
    if not hasattr(opt_state, "hyperparams") or "learning_rate" not in opt_state.hyperparams:
        raise TypeError("opt_state has no injected learning_rate; build it with build_optax")
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(lr, dtype=hyperparams["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hyperparams)
