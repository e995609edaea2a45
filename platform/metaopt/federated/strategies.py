"""Pure, Ray-free server strategies for federated learning.

Every strategy has the same two methods::

    state = strategy.init(global_params)                  # 1-D float tensor (flattened model)
    new_global, state, client_lrs = strategy.aggregate(state, global_params, client_updates)

``client_updates`` is a list of :class:`ClientUpdate` (``delta`` = client model after local
training minus the global model it started from). ``aggregate`` never mutates its inputs; it
returns a fresh :class:`StrategyState`, a plain dataclass of tensors and floats with
``to_dict()`` / ``from_dict()`` (the dict loads with ``torch.load(weights_only=True)``).
``client_lrs`` is the learning rate every client should use next round (one float: all
strategies here hand the same lr to every client).

Δ_t is the unweighted mean of the participating clients' deltas (Reddi et al. 2021, Alg. 2; the FedHyper
authors' code); option ``aggregation: weighted`` weighs them by samples, n_i / Σ_j n_j (McMahan et al. 2017).

Strategies (see each class docstring for its equation):

* :class:`FedAvg` — x_{t+1} = x_t + η_g Δ_t.
* :class:`FedOpt` — FedAdagrad / FedAdam / FedYogi, Reddi et al. 2021, "Adaptive Federated
  Optimization", Algorithm 2.
* :class:`FedExp` — Jhunjhunwala, Wang, Joshi 2023, "FedExP: Speeding Up Federated Averaging
  via Extrapolation", eq. (9).
* :class:`FedHyper` — Wang, Wang, Li 2024 (ICLR), "FedHyper: A Universal and Robust Learning
  Rate Scheduler for Federated Learning with Hypergradient Descent": server-global (G),
  server-global with momentum (GM), server-local (SL) and client-local (CL) schedulers and
  their combinations, plus the exponential-decay client-lr baseline.

Names for :func:`make_strategy` are in :data:`STRATEGIES`. Each strategy's options are a pydantic model of
:mod:`metaopt.federated.config` (:data:`~metaopt.federated.config.STRATEGY_OPTIONS`, the one list of names);
a strategy holds its validated ``options`` and checks nothing again. Built from a name, a mapping or keywords,
the options are validated on the way in, so a bad one is one ConfigError naming ``strategy.<option>``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from metaopt.errors import ConfigError
from metaopt.federated.config import (
    STRATEGY_NAMES,
    STRATEGY_OPTIONS,
    FedAvgOptions,
    FedExpOptions,
    FedHyperBase,
    FedOptOptions,
    StrategyOptions,
)

__all__ = [
    "STRATEGIES",
    "ClientUpdate",
    "FedAvg",
    "FedExp",
    "FedHyper",
    "FedOpt",
    "StrategyState",
    "aggregate_delta",
    "cl_beta",
    "make_strategy",
    "mean_delta",
    "weighted_delta",
]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's round result: ``delta`` = local model after training − global model (1-D)."""

    delta: torch.Tensor
    num_samples: int
    local_lr: float


@dataclass
class StrategyState:
    """Server state between rounds. Plain data: checkpoint it with ``to_dict()``.

    ``round``: rounds aggregated so far. ``alpha``: FedHyper server-global offset a (global lr
    is 1 + a). ``alpha_sl``: FedHyper server-local accumulator. ``lr0``: the base client lr
    (from the options, else the first round's ``local_lr``). ``client_lr``: lr for the next
    round. ``server_lr``: the global lr used in the last round. ``m`` / ``v``: FedOpt moments,
    or ``m`` = FedHyper-GM server momentum. ``last_delta``: Δ_{t−1}, the last averaged delta,
    which FedHyper-CL clients need (see :func:`cl_beta`). ``previous_global``: x_t, the global model
    before the last round (FedExP evaluates (x_t + x_{t+1}) / 2).
    """

    round: int = 0
    alpha: float = 0.0
    alpha_sl: float = 0.0
    lr0: float | None = None
    client_lr: float | None = None
    server_lr: float = 1.0
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    last_delta: torch.Tensor | None = None
    previous_global: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StrategyState:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError("state", f"unknown keys {unknown}; allowed: {', '.join(sorted(names))}")
        kwargs = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
        return cls(**kwargs)


# --------------------------------------------------------------------------- helpers


def _check(global_params: torch.Tensor, updates: Sequence[ClientUpdate]) -> None:
    if global_params.dim() != 1 or not global_params.is_floating_point():
        raise ValueError(f"global_params must be a 1-D float tensor, got shape {tuple(global_params.shape)}")
    if not updates:
        raise ValueError("aggregate needs at least one client update")
    for i, u in enumerate(updates):
        if u.delta.shape != global_params.shape:
            raise ValueError(f"client {i}: delta shape {tuple(u.delta.shape)} != {tuple(global_params.shape)}")
        if u.num_samples < 0:
            raise ValueError(f"client {i}: num_samples must be >= 0, got {u.num_samples}")


def weighted_delta(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """Δ_t = Σ_i (n_i / Σ_j n_j) Δ_i  (FedAvg, McMahan et al. 2017, Alg. 1)."""
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise ValueError("client updates carry no samples (Σ n_i = 0)")
    out = torch.zeros_like(updates[0].delta)
    for u in updates:
        out = out + (u.num_samples / total) * u.delta
    return out


def mean_delta(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """Unweighted mean Δ̄ = (1/K) Σ_i Δ_i over the K participating clients (Reddi et al. 2021, Alg. 2)."""
    return torch.stack([u.delta for u in updates]).mean(dim=0)


def aggregate_delta(updates: Sequence[ClientUpdate], aggregation: str = "mean") -> torch.Tensor:
    """Δ_t by the ``aggregation`` option: ``mean`` (:func:`mean_delta`) or ``weighted`` (:func:`weighted_delta`)."""
    return weighted_delta(updates) if aggregation == "weighted" else mean_delta(updates)


def _dot(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).to(a.device).double()))


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _resolve_lr0(state: StrategyState, updates: Sequence[ClientUpdate]) -> float:
    if state.lr0 is not None:
        return state.lr0
    return float(sum(u.local_lr for u in updates) / len(updates))


def cl_beta(
    beta_prev: float,
    u_k: torch.Tensor,
    u_prev: torch.Tensor | None,
    delta_prev_global: torch.Tensor | None,
    num_clients_total: int,
    fraction: float,
    *,
    gamma_max: float = 1.1,
    global_scale: float = 0.1,
    bounds: tuple[float, float] = (0.1, 10.0),
) -> float:
    """FedHyper client-local (CL) lr factor after local batch k (Wang, Wang, Li, ICLR 2024, §3.3,
    client-side hypergradient, as in the authors' code).

        γ_k = min(γ_max, 1 + 0.1 · ⟨u_k, Δ_{t−1}⟩ / (N·C) + ⟨u_k, u_{k−1}⟩)
        β_k = clip(γ_k · β_{k−1}, 0.1, 10)

    ``u_k`` is the parameter change of local batch k, ``u_prev`` = u_{k−1}, ``delta_prev_global``
    = Δ_{t−1} from the server (``state.last_delta``; None in round 1: term 0), N =
    ``num_clients_total``, C = ``fraction`` of clients sampled per round (N·C: clients per round).
    As in the authors' code the first batch's u_{k−1} is Δ_{t−1} (``u_prev`` None means that), and
    (u_{k−1}, β_{k−1}) carry across the local epochs of a round; β starts at 1 each round. The
    client's lr for batch k+1 is lr0 · β_k.
    """
    if num_clients_total <= 0 or fraction <= 0:
        raise ValueError("num_clients_total and fraction must be positive")
    if u_prev is None:
        u_prev = delta_prev_global
    gamma = 1.0 + global_scale * _dot(u_k, delta_prev_global) / (num_clients_total * fraction) + _dot(u_k, u_prev)
    gamma = min(gamma_max, gamma)
    return _clip(gamma * beta_prev, bounds[0], bounds[1])


# --------------------------------------------------------------------------- strategies


def strategy_options(spec: StrategyOptions | Mapping[str, Any] | str, **options: Any) -> StrategyOptions:
    """The validated options model of a strategy given as a model, a mapping with a ``name``, or a name (plus
    ``options``); anything bad is one ConfigError naming ``strategy.<option>``."""
    if isinstance(spec, str):
        spec = {"name": spec}
    elif isinstance(spec, StrategyOptions) and options:
        spec = {**spec.model_dump(exclude_unset=True), "name": spec.name}
    return STRATEGY_OPTIONS.parse({**spec, **options} if isinstance(spec, Mapping) else spec)


class _Strategy:
    """A server strategy over its validated options (``self.options``); subclasses set which options they run
    and the name a bare constructor means."""

    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    default_name: ClassVar[str] = ""

    def __init__(self, options: StrategyOptions | Mapping[str, Any] | None = None, **settings: Any):
        if isinstance(options, Mapping) or options is None:
            options = {"name": self.default_name, **(options or {})}
        self.options = strategy_options(options, **settings)
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{type(self).__name__} runs {self.Options.__name__}, not {type(self.options).__name__}")

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def lr0(self) -> float | None:
        return self.options.lr0

    def init(self, global_params: torch.Tensor) -> StrategyState:
        return StrategyState(lr0=self.lr0, client_lr=self.lr0)

    def evaluated(self, state: StrategyState, global_params: torch.Tensor) -> torch.Tensor:
        """The model a round evaluates and reports: the global model (FedExP: the last two iterates' mean)."""
        return global_params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


class FedAvg(_Strategy):
    """FedAvg with a server lr (McMahan et al. 2017; Reddi et al. 2021, Alg. 1 with SGD server):

        x_{t+1} = x_t + η_g Δ_t,   Δ_t = (1/K) Σ_i Δ_i  (``aggregation: weighted``: Σ_i n_i/n Δ_i).

    Client lr is unchanged (``lr0``, else the clients' own ``local_lr``).
    """

    Options = FedAvgOptions
    default_name = "fedavg"
    options: FedAvgOptions

    def aggregate(self, state, global_params, client_updates):
        _check(global_params, client_updates)
        delta = aggregate_delta(client_updates, self.options.aggregation)
        lr0 = _resolve_lr0(state, client_updates)
        new = dataclasses.replace(
            state,
            round=state.round + 1,
            lr0=lr0,
            client_lr=lr0,
            server_lr=self.options.server_lr,
            last_delta=delta.clone(),
        )
        return global_params + self.options.server_lr * delta, new, lr0


class FedOpt(_Strategy):
    """FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization",
    Algorithm 2), with Δ_t the unweighted mean client delta (``aggregation: weighted``: by samples):

        m_t = β1 m_{t−1} + (1 − β1) Δ_t
        FedAdagrad: v_t = v_{t−1} + Δ_t²
        FedAdam:    v_t = β2 v_{t−1} + (1 − β2) Δ_t²
        FedYogi:    v_t = v_{t−1} − (1 − β2) Δ_t² sign(v_{t−1} − Δ_t²)
        x_{t+1} = x_t + η m_t / (√v_t + τ)

    No bias correction (as in Alg. 2). m_{−1} = 0 and v_{−1} = ``initial_v`` (default τ²,
    the paper's v_{−1} ≥ τ²). Defaults β1 = 0.9, β2 = 0.99, τ = 1e-3, η = 1e-2.
    """

    Options = FedOptOptions
    default_name = "fedadam"
    options: FedOptOptions

    @property
    def initial_v(self) -> float:
        """v_{-1}: the option, else tau^2."""
        return self.options.tau**2 if self.options.initial_v is None else self.options.initial_v

    def init(self, global_params):
        return StrategyState(
            lr0=self.lr0,
            client_lr=self.lr0,
            server_lr=self.options.server_lr,
            m=torch.zeros_like(global_params),
            v=torch.full_like(global_params, self.initial_v),
        )

    def aggregate(self, state, global_params, client_updates):
        _check(global_params, client_updates)
        delta = aggregate_delta(client_updates, self.options.aggregation)
        m_prev = torch.zeros_like(global_params) if state.m is None else state.m
        v_prev = torch.full_like(global_params, self.initial_v) if state.v is None else state.v
        o = self.options
        m = o.beta1 * m_prev + (1.0 - o.beta1) * delta
        d2 = delta * delta
        if o.variant == "adagrad":
            v = v_prev + d2
        elif o.variant == "adam":
            v = o.beta2 * v_prev + (1.0 - o.beta2) * d2
        else:
            v = v_prev - (1.0 - o.beta2) * d2 * torch.sign(v_prev - d2)
        new_global = global_params + o.server_lr * m / (torch.sqrt(v) + o.tau)
        lr0 = _resolve_lr0(state, client_updates)
        new = dataclasses.replace(
            state,
            round=state.round + 1,
            lr0=lr0,
            client_lr=lr0,
            server_lr=o.server_lr,
            m=m,
            v=v,
            last_delta=delta.clone(),
        )
        return new_global, new, lr0


class FedExp(_Strategy):
    """FedExP (Jhunjhunwala, Wang, Joshi, ICLR 2023, eq. (9)): server extrapolation

        η_g = max(1, Σ_{i=1}^{K} ||Δ_i||² / (2K (||Δ̄||² + ε))),   Δ̄ = (1/K) Σ_i Δ_i
        x_{t+1} = x_t + η_g Δ̄

    with K the clients of this round and the unweighted mean, as in the paper. ``eps``
    defaults to 0 (the paper's small ε guards ||Δ̄|| = 0; here η_g = 1 in that case).
    As in the paper (Sec. 4), the model evaluated after round t is the average of the last two
    iterates, (x_t + x_{t+1}) / 2, while training goes on from x_{t+1} (``average_last_two``).
    """

    Options = FedExpOptions
    default_name = "fedexp"
    options: FedExpOptions

    @staticmethod
    def server_lr_for(client_updates: Sequence[ClientUpdate], eps: float = 0.0) -> float:
        """η_g of eq. (9) for one round."""
        k = len(client_updates)
        mean = mean_delta(client_updates)
        denom = 2.0 * k * (_dot(mean, mean) + eps)
        if denom <= 0.0:
            return 1.0
        return max(1.0, sum(_dot(u.delta, u.delta) for u in client_updates) / denom)

    def aggregate(self, state, global_params, client_updates):
        _check(global_params, client_updates)
        eta = self.server_lr_for(client_updates, self.options.eps)
        mean = mean_delta(client_updates)
        lr0 = _resolve_lr0(state, client_updates)
        new = dataclasses.replace(
            state,
            round=state.round + 1,
            lr0=lr0,
            client_lr=lr0,
            server_lr=eta,
            last_delta=mean.clone(),
            previous_global=global_params.clone(),
        )
        return global_params + eta * mean, new, lr0

    def evaluated(self, state: StrategyState, global_params: torch.Tensor) -> torch.Tensor:
        """(x_t + x_{t+1}) / 2 once a round has run (FedExP, Sec. 4), else x_{t+1} itself."""
        if not self.options.average_last_two or state.previous_global is None:
            return global_params
        return 0.5 * (state.previous_global + global_params)


class FedHyper(_Strategy):
    """FedHyper (Wang, Wang, Li, ICLR 2024, "FedHyper: A Universal and Robust Learning Rate
    Scheduler for Federated Learning with Hypergradient Descent"), following the authors' code.

    Δ_t = unweighted mean client delta (``aggregation: weighted``: by samples); hypergradient
    h_t = ⟨Δ_t, Δ_{t−1}⟩ (0 in round 1).

    ``server`` (global model update):

    * ``"avg"``: x_{t+1} = x_t + Δ_t.
    * ``"g"`` (server-global, paper eq. for the global lr; α_g = 1 + a):
      a ← clip(a + h_t, −0.8, 4);  x_{t+1} = x_t + (1 + a) Δ_t   (global lr in [0.2, 5]).
    * ``"gm"`` (server-global with momentum): h_t = ⟨Δ_t, m_{t−1}⟩;
      a ← clip(a + h_t, −0.2, 4);  x_{t+1} = x_t + (1 + a) Δ_t + μ a m_{t−1};
      m_t = Δ_t + μ m_{t−1}, μ = 0.9.

    ``client_lr`` (lr handed to all clients for the next round):

    * ``"fixed"``: lr0.
    * ``"sl"`` (server-local): a_sl ← a_sl + h_t (h_t = ⟨Δ_t, Δ_{t−1}⟩, unclipped);
      lr_{t+1} = clip(lr0 (1 + a_sl), 0.001, 0.1).
    * ``"cl"`` (client-local): clients scale lr0 per local batch by β_k from :func:`cl_beta`
      (β reset to 1 each round, the first u_{k−1} is Δ_{t−1}); the server hands out lr0 and
      Δ_{t−1} in ``state.last_delta``.
      :meth:`client_beta` binds N and C.
    * ``"decay"`` (baseline): lr_{t+1} = lr0 γ^t, γ = 0.995.

    Named combinations (:data:`~metaopt.federated.config.FEDHYPER_PRESETS`): ``fedhyper_full`` =
    GM + CL (the paper's full FedHyper), ``decay_g`` = G + decay (the paper's Decay-G), and others.

    ``lr0`` is the base client lr; if None, the first round's mean ``local_lr``.
    """

    Options = FedHyperBase
    default_name = "fedhyper"
    options: FedHyperBase
    DEFAULT_ALPHA_BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {
        "avg": (-math.inf, math.inf),
        "g": (-0.8, 4.0),
        "gm": (-0.2, 4.0),
    }

    @property
    def server(self) -> str:
        """The server rule: avg, g or gm."""
        return self.options.rules()[0]

    @property
    def client_lr(self) -> str:
        """The client-lr rule: fixed, sl, cl or decay."""
        return self.options.rules()[1]

    @property
    def name(self) -> str:
        """``fedhyper`` + the server rule + the client-lr rule (``fedhyper_g``, ``fedhyper_gm_sl``, ...)."""
        server = {"avg": "", "g": "_g", "gm": "_gm"}[self.server]
        return "fedhyper" + server + ("" if self.client_lr == "fixed" else f"_{self.client_lr}")

    @property
    def alpha_bounds(self) -> tuple[float, float]:
        """The clip of the server offset a: the option, else the paper's bounds for the server rule."""
        return self.options.alpha_bounds or self.DEFAULT_ALPHA_BOUNDS[self.server]

    def init(self, global_params):
        m = torch.zeros_like(global_params) if self.server == "gm" else None
        return StrategyState(lr0=self.lr0, client_lr=self.lr0, m=m)

    def aggregate(self, state, global_params, client_updates):
        _check(global_params, client_updates)
        delta = aggregate_delta(client_updates, self.options.aggregation)
        o = self.options
        lo, hi = self.alpha_bounds
        alpha = state.alpha
        m_new = state.m
        if self.server == "avg":
            server_lr = 1.0
            new_global = global_params + delta
        elif self.server == "g":
            alpha = _clip(alpha + _dot(delta, state.last_delta), lo, hi)
            server_lr = 1.0 + alpha
            new_global = global_params + server_lr * delta
        else:  # gm
            m_prev = torch.zeros_like(global_params) if state.m is None else state.m
            alpha = _clip(alpha + _dot(delta, m_prev), lo, hi)
            server_lr = 1.0 + alpha
            new_global = global_params + server_lr * delta + o.momentum * alpha * m_prev
            m_new = delta + o.momentum * m_prev

        lr0 = _resolve_lr0(state, client_updates)
        rounds = state.round + 1
        alpha_sl = state.alpha_sl
        if self.client_lr == "sl":
            alpha_sl = alpha_sl + _dot(delta, state.last_delta)
            next_lr = _clip(lr0 * (1.0 + alpha_sl), *o.sl_bounds)
        elif self.client_lr == "decay":
            next_lr = lr0 * o.decay_gamma**rounds
        else:  # fixed, cl (cl clients rescale lr0 per batch themselves)
            next_lr = lr0
        new = dataclasses.replace(
            state,
            round=rounds,
            alpha=alpha,
            alpha_sl=alpha_sl,
            lr0=lr0,
            client_lr=next_lr,
            server_lr=server_lr,
            m=m_new,
            last_delta=delta.clone(),
        )
        return new_global, new, next_lr

    def client_beta(
        self, state: StrategyState, beta_prev: float, u_k: torch.Tensor, u_prev: torch.Tensor | None
    ) -> float:
        """:func:`cl_beta` with this strategy's N, C, constants and Δ_{t−1} = ``state.last_delta``."""
        o = self.options
        return cl_beta(
            beta_prev,
            u_k,
            u_prev,
            state.last_delta,
            o.num_clients_total,
            o.fraction,
            gamma_max=o.cl_gamma_max,
            global_scale=o.cl_global_scale,
            bounds=o.cl_bounds,
        )


# --------------------------------------------------------------------------- registry

#: The names :func:`make_strategy` builds (those of :data:`~metaopt.federated.config.STRATEGY_OPTIONS`).
STRATEGIES = STRATEGY_NAMES

#: Which class runs which options: a strategy's options model (or a base of it) -> the class.
_CLASSES: tuple[type[_Strategy], ...] = (FedAvg, FedOpt, FedExp, FedHyper)


def make_strategy(spec: StrategyOptions | Mapping[str, Any] | str, **options: Any) -> _Strategy:
    """A strategy from its name and options (``make_strategy("fedadam", beta1=0.0)``), a mapping with a ``name``,
    or a validated options model; unknown names or options, and bad values, raise one ConfigError."""
    validated = strategy_options(spec, **options)
    cls = next(c for c in _CLASSES if isinstance(validated, c.Options))
    return cls(validated)
