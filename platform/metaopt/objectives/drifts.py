"""Drift functions: PPO's clipping and learned RL objectives in the mirror-learning view.

Mirror learning (Kuba et al., "Mirror Learning: A Unifying Framework of Policy
Optimisation", ICML 2022) writes the PPO actor loss as

    L(theta) = -E[ r * A - D(r, A) ],      r = pi_theta(a|s) / pi_old(a|s),

where ``A`` is the (per-minibatch normalised) advantage and ``D`` a *drift*: a penalty
that is >= 0 everywhere and exactly 0 at ``r == 1``. Every drift here is a pure JAX
function of one uniform signature::

    drift(params, ratio, advantage, progress=None) -> penalty   # same shape as ratio

* ``"ppo"`` -- PPO's clipping (Schulman et al. 2017, eq. 7) written as a drift,
  ``relu((r - clip(r, 1-eps, 1+eps)) * A)``; then ``r*A - D = min(r*A, clip(r)*A)``,
  the clipped surrogate objective. ``params`` is unused.
* ``"dpo"`` -- Discovered Policy Optimisation (Lu et al., "Discovered Policy
  Optimisation", NeurIPS 2022, eq. 6), the closed form distilled from LPO with
  ``alpha = 2``, ``beta = 0.6``. ``params`` is unused.
* ``"lpo"`` -- Learned Policy Optimisation (Lu et al. 2022, Sec. 4): a bias-free
  MLP ``Dense(H) -> tanh -> Dense(1)`` on 8 features of ``(r, A)`` added to the PPO
  drift, ``relu(net(x) + D_ppo(r, A) - 1e-4)``. With zero weights it *is* PPO (up to
  the 1e-4 offset), which is where evolution strategies start the search.
* ``"ta_lpo"`` -- Temporally-Aware LPO (Jackson et al., "Discovering Temporally-Aware
  Reinforcement Learning Algorithms", ICLR 2024, eq. 10): LPO whose network also sees the
  training progress ``n/N`` (``n`` environment steps taken, ``N`` the run's total). Progress
  enters *multiplicatively*, so a bias-free network keeps ``D(r=1) = 0`` exactly: the input is
  ``[x, (n/N)*x]``, 16 features (option ``time_inputs: fraction``, the default). For
  meta-training over several horizons, ``time_inputs: fraction_and_log_horizon`` appends
  ``log(N)*x`` (24 features; an extension: the paper gives ``log N`` to TA-LPG only).

The learned drifts carry a parameter pytree ``{"hidden": [F, H], "out": [H, 1]}``
(float32, no biases); :func:`make_drift` returns it filled with zeros. The drift
callables are :func:`functools.partial` objects over module-level functions, so they
pickle (Ray) and can be closed over by ``jax.jit`` / ``jax.vmap`` / ``jax.grad``.
Each drift's options are a pydantic model chosen by ``name`` (:data:`DRIFTS`, the one list of drift
names); bad names or options raise :class:`~metaopt.errors.ConfigError` (a ``ValueError``) with
one line naming the option (``lpo.clip_eps: ...``) and the allowed values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from pydantic import ConfigDict, Field, Strict

from metaopt.errors import ConfigError
from metaopt.optim.specs import NamedSpec, NamedSpecs, Number, literal_name

__all__ = [
    "DRIFTS",
    "DRIFT_NAMES",
    "LPO_OFFSET",
    "MIN_RATIO",
    "TIME_INPUTS",
    "DriftSpec",
    "Progress",
    "dpo_drift",
    "feature_names",
    "is_learned",
    "lpo_drift",
    "lpo_features",
    "make_drift",
    "num_features",
    "num_params",
    "ppo_drift",
    "ta_lpo_drift",
    "ta_lpo_features",
    "zero_params",
]

LEARNED_DRIFTS = ("lpo", "ta_lpo")

#: Offset subtracted inside LPO's final relu (Lu et al. 2022): relu(net + D_ppo - 1e-4).
LPO_OFFSET = 1e-4
#: Ratios are clamped to at least this before ``log`` (PPO ratios are > 0, but a
#: probability can underflow to 0 in float32).
MIN_RATIO = 1e-8

#: PPO's clip range epsilon: in (0, 1).
ClipEps = Annotated[Number, Field(gt=0, lt=1)]


class DriftOptions(NamedSpec):
    """A drift's options; a subclass per drift fixes ``name``."""

    model_config = ConfigDict(frozen=True)


class PPODriftOptions(DriftOptions):
    """PPO's clip (Schulman et al. 2017, eq. 7)."""

    name: Literal["ppo"] = "ppo"
    clip_eps: ClipEps = Field(default=0.2, description="Clip range epsilon.")


class DPODriftOptions(DriftOptions):
    """Discovered Policy Optimisation's closed form (Lu et al. 2022, eq. 5)."""

    name: Literal["dpo"] = "dpo"
    alpha: Number = Field(default=2.0, gt=0, description="alpha of the positive-advantage branch.")
    beta: Number = Field(default=0.6, gt=0, description="beta of the negative-advantage branch.")


class LearnedDriftOptions(DriftOptions):
    """A drift network (no biases) over features of (r, A): its width and the PPO clip its output is added to."""

    hidden: Annotated[int, Strict()] = Field(default=128, ge=1, description="Tanh units of the network.")
    clip_eps: ClipEps = Field(default=0.2, description="Clip range of the PPO drift inside the network's relu.")


class LPODriftOptions(LearnedDriftOptions):
    name: Literal["lpo"] = "lpo"


#: TA-LPO's temporal inputs: ``fraction`` is the paper's ``[x, (n/N)*x]`` (Jackson et al. 2024, eq. 10);
#: ``fraction_and_log_horizon`` adds ``log(N)*x`` for meta-training over several horizons.
TimeInputs = Literal["fraction", "fraction_and_log_horizon"]
TIME_INPUTS: tuple[str, ...] = ("fraction", "fraction_and_log_horizon")


class TALPODriftOptions(LearnedDriftOptions):
    name: Literal["ta_lpo"] = "ta_lpo"
    time_inputs: TimeInputs = Field(
        default="fraction",
        description="Temporal inputs: 'fraction' = [x, (n/N)*x] (Jackson et al. 2024, eq. 10); "
        "'fraction_and_log_horizon' adds log(N)*x (multi-horizon meta-training).",
    )


#: The drifts: name -> options model. The one list of drift names.
DRIFTS: NamedSpecs[DriftOptions] = NamedSpecs("drift")
for _model in (PPODriftOptions, DPODriftOptions, LPODriftOptions, TALPODriftOptions):
    DRIFTS.register(literal_name(_model), _model)
DRIFT_NAMES = DRIFTS.names()

_BASE_FEATURES = ("(r-1)", "(r-1)^2", "log(r)", "log(r)^2")
_LPO_FEATURES = _BASE_FEATURES + tuple(f"A*{name}" for name in _BASE_FEATURES)
_TA_LPO_FEATURES = _LPO_FEATURES + tuple(f"fraction*{name}" for name in _LPO_FEATURES)
_TA_LPO_LOG_HORIZON_FEATURES = _TA_LPO_FEATURES + tuple(f"log_horizon*{name}" for name in _LPO_FEATURES)


class Progress(NamedTuple):
    """Where a PPO run is: the inputs TA-LPO (Jackson et al., ICLR 2024) conditions on.

    :mod:`metaopt.objectives.ppo` builds one per update. The drifts only read ``.fraction``
    and ``.log_horizon``, so any object with those two attributes (scalars or arrays
    broadcastable to the ratio) works.
    """

    fraction: jax.Array  # n/N: env steps taken before this update's rollout / the run's total env steps
    log_horizon: jax.Array  # log(N), N = the run's total env steps (read only by time_inputs=fraction_and_log_horizon)


# ---------------------------------------------------------------------------
# Drifts. Module-level (not closures) so that partials of them pickle.
# ---------------------------------------------------------------------------


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _log_ratio(ratio: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(ratio, MIN_RATIO))


def ppo_drift(params: Any, ratio: Any, advantage: Any, progress: Any = None, *, clip_eps: float = 0.2) -> jax.Array:
    """PPO's clipping as a drift (Schulman et al. 2017, eq. 7; Kuba et al. 2022, Sec. 4).

    ``D = relu((r - clip(r, 1-eps, 1+eps)) * A)``, so ``r*A - D = min(r*A, clip(r)*A)``.
    ``params`` and ``progress`` are ignored.
    """
    ratio, advantage = _f32(ratio), _f32(advantage)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return jax.nn.relu((ratio - clipped) * advantage)


def dpo_drift(
    params: Any,
    ratio: Any,
    advantage: Any,
    progress: Any = None,
    *,
    alpha: float = 2.0,
    beta: float = 0.6,
) -> jax.Array:
    """DPO's closed-form drift (Lu et al., "Discovered Policy Optimisation", 2022, eq. 6).

    ``A >= 0``: ``relu((r-1)*A - alpha*tanh((r-1)*A/alpha))``;
    ``A < 0``:  ``relu(log(r)*A - beta*tanh(log(r)*A/beta))``.
    ``params`` and ``progress`` are ignored. ``log`` sees ``max(r, MIN_RATIO)``.
    """
    ratio, advantage = _f32(ratio), _f32(advantage)
    positive = (ratio - 1.0) * advantage
    negative = _log_ratio(ratio) * advantage
    drift_pos = jax.nn.relu(positive - alpha * jnp.tanh(positive / alpha))
    drift_neg = jax.nn.relu(negative - beta * jnp.tanh(negative / beta))
    return jnp.where(advantage >= 0.0, drift_pos, drift_neg)


def lpo_features(ratio: Any, advantage: Any) -> jax.Array:
    """LPO's 8 network inputs (Lu et al. 2022, Sec. 4), stacked on a new last axis.

    ``[r-1, (r-1)^2, log r, (log r)^2]`` followed by each of those times ``A``. All are
    exactly 0 at ``r == 1``, so a bias-free network outputs exactly 0 there.
    """
    ratio, advantage = _f32(ratio), _f32(advantage)
    ratio, advantage = jnp.broadcast_arrays(ratio, advantage)
    delta = ratio - 1.0
    log_r = _log_ratio(ratio)
    base = [delta, delta * delta, log_r, log_r * log_r]
    return jnp.stack(base + [advantage * x for x in base], axis=-1)


def ta_lpo_features(ratio: Any, advantage: Any, progress: Any, time_inputs: str = "fraction") -> jax.Array:
    """TA-LPO's network inputs (Jackson et al., ICLR 2024, eq. 10): ``[x, (n/N)*x]``, 16 features.

    ``x`` are the 8 LPO features; ``time_inputs="fraction_and_log_horizon"`` appends ``log(N)*x``
    (24 features). Progress scales features that vanish at ``r == 1``, so ``D(r=1) = 0`` holds exactly.
    """
    if progress is None:
        raise ConfigError("ta_lpo", "needs progress=Progress(fraction, log_horizon); got None")
    base = lpo_features(ratio, advantage)
    blocks = [base, _f32(progress.fraction)[..., None] * base]
    if time_inputs == "fraction_and_log_horizon":
        blocks.append(_f32(progress.log_horizon)[..., None] * base)
    return jnp.concatenate(blocks, axis=-1)


def _network(params: Mapping[str, Any], features: jax.Array) -> jax.Array:
    hidden = jnp.tanh(features @ _f32(params["hidden"]))
    return (hidden @ _f32(params["out"]))[..., 0]


def lpo_drift(
    params: Mapping[str, Any],
    ratio: Any,
    advantage: Any,
    progress: Any = None,
    *,
    clip_eps: float = 0.2,
) -> jax.Array:
    """LPO's drift (Lu et al. 2022, Sec. 4): ``relu(net(x) + D_ppo(r, A) - 1e-4)``.

    ``net`` is ``Dense(H, no bias) -> tanh -> Dense(1, no bias)`` on
    :func:`lpo_features`; ``params = {"hidden": [8, H], "out": [H, 1]}``. Zero weights
    give ``relu(D_ppo - 1e-4)``. ``progress`` is ignored.
    """
    net = _network(params, lpo_features(ratio, advantage))
    ppo = ppo_drift(None, ratio, advantage, clip_eps=clip_eps)
    return jax.nn.relu(net + ppo - LPO_OFFSET)


def ta_lpo_drift(
    params: Mapping[str, Any],
    ratio: Any,
    advantage: Any,
    progress: Any = None,
    *,
    clip_eps: float = 0.2,
    time_inputs: str = "fraction",
) -> jax.Array:
    """Temporally-aware LPO (Jackson et al., ICLR 2024, eq. 10): LPO on :func:`ta_lpo_features`.

    ``relu(net(x_t) + D_ppo(r, A) - 1e-4)`` with ``params = {"hidden": [F, H], "out": [H, 1]}``,
    F = 16 (``time_inputs="fraction"``) or 24 (``"fraction_and_log_horizon"``); ``progress`` (a
    :class:`Progress`) is required.
    """
    net = _network(params, ta_lpo_features(ratio, advantage, progress, time_inputs))
    ppo = ppo_drift(None, ratio, advantage, clip_eps=clip_eps)
    return jax.nn.relu(net + ppo - LPO_OFFSET)


_DRIFT_FUNCTIONS: dict[str, Callable[..., jax.Array]] = {
    "ppo": ppo_drift,
    "dpo": dpo_drift,
    "lpo": lpo_drift,
    "ta_lpo": ta_lpo_drift,
}


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------


def _check_name(name: Any) -> str:
    DRIFTS.model(name)  # a ConfigError on drift.name listing the drift names
    return name


def drift_options(name: Any, options: Mapping[str, Any]) -> DriftOptions:
    """The validated options of drift ``name``; a ConfigError naming ``<name>.<option>`` otherwise."""
    return DRIFTS.parse({**options, "name": _check_name(name)}, field=name)


@dataclass(frozen=True)
class DriftSpec:
    """A drift by name with its resolved options; hashable, so usable as a static jit arg.

    ``options`` is a sorted tuple of ``(key, value)`` pairs holding *every* option of the
    drift (defaults filled in); :meth:`as_dict` gives it back as a dict. Build one with
    :meth:`create`, which validates.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def create(cls, name: str, **options: Any) -> DriftSpec:
        """Validate ``name`` and ``options`` with the drift's options model (ConfigError on a bad one), fill
        defaults."""
        resolved = drift_options(name, options).model_dump(exclude={"name"})
        return cls(name, tuple(sorted(resolved.items())))

    def as_dict(self) -> dict[str, Any]:
        """All options as a dict (defaults filled in, also for a spec built without :meth:`create`)."""
        return {**drift_options(self.name, {}).model_dump(exclude={"name"}), **dict(self.options)}

    @property
    def learned(self) -> bool:
        return self.name in LEARNED_DRIFTS

    def drift_fn(self) -> Callable[..., jax.Array]:
        """``drift(params, ratio, advantage, progress=None)`` with the options bound.

        Equal specs give the *same* callable object, so a ``jax.jit`` that takes it as a
        static argument (or closes over it) compiles once per distinct drift.
        """
        return _bound_drift(self)

    def init_params(self) -> dict[str, jax.Array]:
        """Zeros for the learned drifts (ES starts at PPO), ``{}`` for ppo/dpo."""
        if not self.learned:
            return {}
        options = self.as_dict()
        return zero_params(self.name, options["hidden"], options.get("time_inputs", "fraction"))

    def feature_names(self) -> tuple[str, ...]:
        """The network's inputs in order (``()`` for ppo/dpo)."""
        return feature_names(self.name, self.as_dict().get("time_inputs", "fraction"))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        if not self.learned:
            return {}
        hidden = self.as_dict()["hidden"]
        return {"hidden": (len(self.feature_names()), hidden), "out": (hidden, 1)}

    def build(self) -> tuple[Callable[..., jax.Array], dict[str, jax.Array]]:
        return self.drift_fn(), self.init_params()


@functools.cache
def _bound_drift(spec: DriftSpec) -> Callable[..., jax.Array]:
    keywords = {k: v for k, v in spec.options if k != "hidden"}
    return functools.partial(_DRIFT_FUNCTIONS[spec.name], **keywords)


def make_drift(name: str, **options: Any) -> tuple[Callable[..., jax.Array], dict[str, Any]]:
    """``(drift_fn, initial_params)`` for a drift in :data:`DRIFT_NAMES`.

    ``drift_fn(params, ratio, advantage, progress=None)`` is pure and float32. Options:
    ppo ``clip_eps``; dpo ``alpha``, ``beta``; lpo/ta_lpo ``hidden``, ``clip_eps``; ta_lpo ``time_inputs``.
    ``initial_params`` is ``{"hidden": zeros[F, H], "out": zeros[H, 1]}`` for lpo (F=8) /
    ta_lpo (F=16, or 24 with ``time_inputs="fraction_and_log_horizon"``) and ``{}`` for ppo/dpo.
    """
    return DriftSpec.create(name, **options).build()


def is_learned(name: str) -> bool:
    """Whether the drift has parameters to meta-learn (lpo, ta_lpo)."""
    return _check_name(name) in LEARNED_DRIFTS


def num_features(name: str, time_inputs: str = "fraction") -> int:
    """Network input width: 8 for lpo, 16 for ta_lpo (24 with ``fraction_and_log_horizon``), 0 for ppo/dpo."""
    return len(feature_names(name, time_inputs))


def feature_names(name: str, time_inputs: str = "fraction") -> tuple[str, ...]:
    """Human-readable names of the network inputs, in order (``()`` for ppo/dpo); ``time_inputs``: ta_lpo's."""
    name = _check_name(name)
    if time_inputs not in TIME_INPUTS:
        raise ConfigError("ta_lpo.time_inputs", f"must be one of {', '.join(TIME_INPUTS)}; got {time_inputs!r}")
    ta_lpo = _TA_LPO_FEATURES if time_inputs == "fraction" else _TA_LPO_LOG_HORIZON_FEATURES
    return {"lpo": _LPO_FEATURES, "ta_lpo": ta_lpo}.get(name, ())


def zero_params(name: str, hidden: int = 128, time_inputs: str = "fraction") -> dict[str, jax.Array]:
    """The all-zero parameter pytree of a learned drift (the drift then equals PPO)."""
    if not is_learned(name):
        raise ConfigError("drift", f"{name!r} has no parameters; learned drifts: lpo, ta_lpo")
    return {
        "hidden": jnp.zeros((num_features(name, time_inputs), hidden), jnp.float32),
        "out": jnp.zeros((hidden, 1), jnp.float32),
    }


def num_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (1,152 for LPO with H=128)."""
    return sum(int(math.prod(jnp.shape(leaf))) for leaf in jax.tree_util.tree_leaves(params))
