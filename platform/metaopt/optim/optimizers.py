"""Optimizers from a spec, for torch and for optax, with the learning rate kept mutable; and their registry.

A spec names the optimizer and, optionally, its hyperparameters::

    {"name": "adamw", "lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}

=========  =================================================================================
``sgd``    ``momentum`` 0.9, ``nesterov`` False, ``weight_decay`` 0.0 (L2 added to the grad)
``adamw``  ``betas`` (0.9, 0.999), ``eps`` 1e-8, ``weight_decay`` 0.01 (decoupled)
``lion``   ``betas`` (0.9, 0.99), ``weight_decay`` 0.0 (decoupled)
=========  =================================================================================

``lr`` defaults to 1e-3. Each optimizer is a pydantic model (:class:`SGDSpec`, ...) registered with
:func:`register_optimizer` together with its torch and optax builders; capabilities register more through their
``Capability.provides`` hooks (``symbolic`` registers ``program``, an optimizer program), run by
:func:`load_optimizer_providers` the first time a name is looked up. Both builders read the same validated
spec, so the torch and optax versions of one spec run the same algorithm with the same hyperparameters (the
tests check them step by step).

Outer loops (PBT, schedule replay) change the learning rate between steps without
rebuilding the optimizer, which would lose its moments: in torch with
:func:`set_learning_rate`, in optax through ``optax.inject_hyperparams``, which keeps
``learning_rate`` in ``state.hyperparams`` (see :func:`set_optax_learning_rate`).

torch, optax and jax are imported inside the builders: validating a spec (loading an experiment file)
imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, StrictBool, ValidationError, model_validator

from metaopt import registry
from metaopt.config import StrictModel, first_error
from metaopt.errors import ConfigError
from metaopt.optim.specs import Betas, Decay, LearningRate, NamedSpec, NamedSpecs, Number

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "OptimizerSpecModel",
    "build_optax",
    "build_optimizer",
    "load_optimizer_providers",
    "optimizer_names",
    "register_optimizer",
    "resolve_optimizer_spec",
    "set_learning_rate",
    "set_optax_learning_rate",
]


class OptimizerSpecModel(NamedSpec):
    """An optimizer spec; every optimizer has a learning rate (what outer loops adapt)."""

    lr: LearningRate = 1e-3

    def resolved(self) -> dict[str, Any]:
        """The spec as plain data with every default filled in and every reference read (a program file ->
        the program), what :func:`resolve_optimizer_spec` returns."""
        return self.model_dump()


# SGD/AdamW follow torch.optim; Lion follows Chen et al. 2023 (betas 0.9/0.99).


class SGDSpec(OptimizerSpecModel):
    """SGD with (Nesterov) momentum; weight decay is L2 added to the gradient, as in ``torch.optim.SGD``."""

    name: Literal["sgd"] = "sgd"
    momentum: Decay = 0.9
    nesterov: StrictBool = False
    weight_decay: Number = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDSpec:
        # Nesterov's look-ahead is defined through the momentum buffer; torch refuses it too.
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError("nesterov", "true needs optimizer.momentum in (0, 1), got momentum 0")
        return self


class AdamWSpec(OptimizerSpecModel):
    """AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"."""

    name: Literal["adamw"] = "adamw"
    betas: Betas = (0.9, 0.999)
    eps: Number = Field(default=1e-8, gt=0)
    weight_decay: Number = Field(default=0.01, ge=0)


class LionSpec(OptimizerSpecModel):
    """Lion: Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms" (decoupled weight decay)."""

    name: Literal["lion"] = "lion"
    betas: Betas = (0.9, 0.99)
    weight_decay: Number = Field(default=0.0, ge=0)


@dataclass(frozen=True)
class OptimizerBuilders:
    """How to build one registered optimizer from its validated spec.

    ``torch(params, spec)`` returns a ``torch.optim.Optimizer`` whose ``param_groups`` hold ``lr``;
    ``optax(spec)`` returns an ``optax.GradientTransformation`` built through ``optax.inject_hyperparams``,
    so ``state.hyperparams["learning_rate"]`` exists; None when the optimizer has no optax version."""

    torch: Callable[[Any, Any], Any]
    optax: Callable[[Any], Any] | None = None


_providers_loaded = False


def load_optimizer_providers() -> None:
    """Let every capability register the optimizers it provides (``Capability.provides``), once per process."""
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True  # first: a provider that looks a name up while registering must not recurse
    registry.load_providers()


#: The optimizers, by name: the one list of their names (providers add theirs when it is first read).
OPTIMIZERS: NamedSpecs[Any] = NamedSpecs("optimizer", load_optimizer_providers)
_BUILDERS: dict[str, OptimizerBuilders] = {}

#: A config field holding an optimizer spec (stored as its model; dumped as plain data).
OptimizerSpec = OPTIMIZERS.field_type()


def register_optimizer(
    name: str,
    spec: type[OptimizerSpecModel],
    build_torch: Callable[[Any, Any], Any],
    build_optax: Callable[[Any], Any] | None = None,
) -> None:
    """Make ``name`` an optimizer choice everywhere a spec is accepted.

    ``spec`` is its pydantic model (a subclass of :class:`OptimizerSpecModel` with ``name: Literal[name]``);
    the builders get the validated model (see :class:`OptimizerBuilders`)."""
    OPTIMIZERS.register(name, spec)
    _BUILDERS[name] = OptimizerBuilders(build_torch, build_optax)


def optimizer_names() -> tuple[str, ...]:
    """Every registered optimizer name, providers' included."""
    return OPTIMIZERS.names()


def resolve_optimizer_spec(spec: Any) -> dict[str, Any]:
    """Validate an optimizer spec (a mapping or its model) and fill in defaults: ``{"name": ..., <every
    hyperparameter>}``.

    Raises ConfigError naming ``optimizer.<key>`` for an unknown name or key, or a value
    outside its range (lr > 0; momentum and betas in [0, 1); eps > 0; weight_decay >= 0).
    """
    return OPTIMIZERS.parse(spec).resolved()


def _hyperparams(spec: OptimizerSpecModel) -> dict[str, Any]:
    """The spec's fields but ``name``: the keyword arguments of the torch constructors."""
    return {key: value for key, value in spec.model_dump().items() if key != "name"}


def _torch_sgd(params: Any, spec: SGDSpec) -> Any:
    import torch

    return torch.optim.SGD(params, **_hyperparams(spec))


def _torch_adamw(params: Any, spec: AdamWSpec) -> Any:
    import torch

    return torch.optim.AdamW(params, **_hyperparams(spec))


def _torch_lion(params: Any, spec: LionSpec) -> Any:
    """The implementation is ``pytorch_optimizer.Lion``; its decoupled weight decay
    (``p *= 1 - lr * wd``) matches the paper and ``optax.lion``."""
    # Imported here: pytorch_optimizer takes seconds to import (benchmarks/results.csv), paid only by Lion users.
    from pytorch_optimizer import Lion

    return Lion(params, **_hyperparams(spec))


def build_optimizer(params: Any, spec: Any) -> Any:
    """A ``torch.optim.Optimizer`` over ``params`` (tensors or param groups) as ``spec`` describes.

    SGD and AdamW are ``torch.optim``'s; Lion is ``pytorch_optimizer.Lion``.
    """
    model = OPTIMIZERS.parse(spec)
    return _BUILDERS[model.name].torch(params, model)


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Write ``lr`` into every param group, keeping the optimizer's state (moments, step).

    ``lr`` may be 0 (a schedule's ``end_lr``) but not negative or non-finite. Per-group
    learning rates are overwritten: one outer loop owns the learning rate.
    """
    lr = _checked_lr(lr)
    for group in optimizer.param_groups:
        group["lr"] = lr


class _NewLearningRate(StrictModel):
    lr: Number = Field(ge=0)  # 0 is a schedule's end_lr


def _checked_lr(lr: Any) -> float:
    try:
        return _NewLearningRate(lr=lr).lr
    except ValidationError as err:
        raise first_error("", _NewLearningRate, err) from None


def _inject(factory: Callable[..., Any], **hyperparams: Any) -> Any:
    import optax

    return optax.inject_hyperparams(factory)(**hyperparams)


def _optax_sgd_chain(learning_rate: Any, momentum: Any, nesterov: bool, weight_decay: Any) -> Any:
    """``torch.optim.SGD`` in optax: L2 decay is added to the gradient *before* momentum."""
    import optax

    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def _optax_sgd(spec: SGDSpec) -> Any:
    return _inject(
        _optax_sgd_chain,
        learning_rate=spec.lr,
        momentum=spec.momentum,
        nesterov=spec.nesterov,
        weight_decay=spec.weight_decay,
    )


def _optax_adamw(spec: AdamWSpec) -> Any:
    import optax

    b1, b2 = spec.betas
    return _inject(optax.adamw, learning_rate=spec.lr, b1=b1, b2=b2, eps=spec.eps, weight_decay=spec.weight_decay)


def _optax_lion(spec: LionSpec) -> Any:
    import optax

    b1, b2 = spec.betas
    return _inject(optax.lion, learning_rate=spec.lr, b1=b1, b2=b2, weight_decay=spec.weight_decay)


def build_optax(spec: Any) -> Any:
    """The optax ``GradientTransformation`` for ``spec``, with its hyperparameters in its state.

    Wrapped in ``optax.inject_hyperparams``, so ``state.hyperparams["learning_rate"]``
    (and the other numeric hyperparameters) can be changed between updates; pass
    ``params`` to ``update`` since weight decay reads them. ``weight_decay`` is always set
    explicitly, because optax's own defaults (adamw 1e-4, lion 1e-3) differ from torch's.
    """
    model = OPTIMIZERS.parse(spec)
    build = _BUILDERS[model.name].optax
    if build is None:
        raise ConfigError("optimizer.name", f"{model.name} has no optax version; it runs with torch only")
    return build(model)


def set_optax_learning_rate(opt_state: Any, lr: float) -> Any:
    """A copy of a :func:`build_optax` state whose next update uses ``lr``.

    Keeps the stored dtype, so a jitted update function is not recompiled.
    """
    import jax.numpy as jnp

    lr = _checked_lr(lr)
    if not hasattr(opt_state, "hyperparams") or "learning_rate" not in opt_state.hyperparams:
        raise TypeError("opt_state has no injected learning_rate; build it with build_optax")
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(lr, dtype=hyperparams["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hyperparams)


register_optimizer("sgd", SGDSpec, _torch_sgd, _optax_sgd)
register_optimizer("adamw", AdamWSpec, _torch_adamw, _optax_adamw)
register_optimizer("lion", LionSpec, _torch_lion, _optax_lion)
