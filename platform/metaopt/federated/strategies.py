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

Δ_t is the FedAvg average of the client deltas, weights n_i / Σ_j n_j (McMahan et al. 2017).

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

Names for :func:`make_strategy` are in :data:`STRATEGIES`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from metaopt.errors import ConfigError

__all__ = [
    "ClientUpdate",
    "StrategyState",
    "weighted_delta",
    "mean_delta",
    "cl_beta",
    "FedAvg",
    "FedOpt",
    "FedExp",
    "FedHyper",
    "STRATEGIES",
    "make_strategy",
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
    which FedHyper-CL clients need (see :func:`cl_beta`).
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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StrategyState":
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
    """Unweighted mean Δ̄ = (1/K) Σ_i Δ_i (used by FedExP)."""
    return torch.stack([u.delta for u in updates]).mean(dim=0)


def _dot(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


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

    ``u_k`` is the parameter change of local batch k, ``u_prev`` = u_{k−1} (None for the first
    batch: term 0), ``delta_prev_global`` = Δ_{t−1} from the server (``state.last_delta``; None
    in round 1: term 0), N = ``num_clients_total``, C = ``fraction`` of clients sampled per
    round. β starts at 1 each round; the client's lr for batch k+1 is lr0 · β_k.
    """
    if num_clients_total <= 0 or fraction <= 0:
        raise ValueError("num_clients_total and fraction must be positive")
    gamma = 1.0 + global_scale * _dot(u_k, delta_prev_global) / (num_clients_total * fraction) + _dot(u_k, u_prev)
    gamma = min(gamma_max, gamma)
    return _clip(gamma * beta_prev, bounds[0], bounds[1])


# --------------------------------------------------------------------------- strategies


class _Strategy:
    name = "strategy"

    def __init__(self, lr0: float | None = None):
        self.lr0 = None if lr0 is None else float(lr0)

    def init(self, global_params: torch.Tensor) -> StrategyState:
        return StrategyState(lr0=self.lr0, client_lr=self.lr0)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class FedAvg(_Strategy):
    """FedAvg with a server lr (McMahan et al. 2017; Reddi et al. 2021, Alg. 1 with SGD server):

        x_{t+1} = x_t + η_g Δ_t,   Δ_t = Σ_i n_i/n Δ_i.

    Client lr is unchanged (``lr0``, else the clients' own ``local_lr``).
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0, lr0: float | None = None):
        super().__init__(lr0)
        self.server_lr = float(server_lr)

    def aggregate(self, state, global_params, client_updates):
        _check(global_params, client_updates)
        delta = weighted_delta(client_updates)
        lr0 = _resolve_lr0(state, client_updates)
        new = dataclasses.replace(
            state, round=state.round + 1, lr0=lr0, client_lr=lr0, server_lr=self.server_lr, last_delta=delta.clone()
        )
        return global_params + self.server_lr * delta, new, lr0


class FedOpt(_Strategy):
    """FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization",
    Algorithm 2), with Δ_t the sample-weighted client delta:

        m_t = β1 m_{t−1} + (1 − β1) Δ_t
        FedAdagrad: v_t = v_{t−1} + Δ_t²
        FedAdam:    v_t = β2 v_{t−1} + (1 − β2) Δ_t²
        FedYogi:    v_t = v_{t−1} − (1 − β2) Δ_t² sign(v_{t−1} − Δ_t²)
        x_{t+1} = x_t + η m_t / (√v_t + τ)

    No bias correction (as in Alg. 2). m_{−1} = 0 and v_{−1} = ``initial_v`` (default τ²,
    the paper's v_{−1} ≥ τ²). Defaults β1 = 0.9, β2 = 0.99, τ = 1e-3, η = 1e-2.
    """

    VARIANTS = ("adagrad", "adam", "yogi")

    def __init__(
        self,
        variant: str = "adam",
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        initial_v: float | None = None,
        lr0: float | None = None,
    ):
        super().__init__(lr0)
        if variant not in self.VARIANTS:
            raise ConfigError("variant", f"unknown {variant!r}; allowed: {', '.join(self.VARIANTS)}")
        for field, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(field, f"must be in [0, 1), got {value!r}")
        if float(tau) <= 0:
            raise ConfigError("tau", f"must be > 0, got {tau!r}")
        self.variant = variant
        self.server_lr = float(server_lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self.initial_v = self.tau**2 if initial_v is None else float(initial_v)
        self.name = "fed" + variant

    def init(self, global_params):
        return StrategyState(
            lr0=self.lr0,
            client_lr=self.lr0,
            server_lr=self.server_lr,
            m=torch.zeros_like(global_params),
            v=torch.full_like(global_params, self.initial_v),
        )

    def aggregate(self, state, global_params, client_updates):
        _check(global_params, client_updates)
        delta = weighted_delta(client_updates)
        m_prev = torch.zeros_like(global_params) if state.m is None else state.m
        v_prev = torch.full_like(global_params, self.initial_v) if state.v is None else state.v
        m = self.beta1 * m_prev + (1.0 - self.beta1) * delta
        d2 = delta * delta
        if self.variant == "adagrad":
            v = v_prev + d2
        elif self.variant == "adam":
            v = self.beta2 * v_prev + (1.0 - self.beta2) * d2
        else:
            v = v_prev - (1.0 - self.beta2) * d2 * torch.sign(v_prev - d2)
        new_global = global_params + self.server_lr * m / (torch.sqrt(v) + self.tau)
        lr0 = _resolve_lr0(state, client_updates)
        new = dataclasses.replace(
            state, round=state.round + 1, lr0=lr0, client_lr=lr0, server_lr=self.server_lr,
            m=m, v=v, last_delta=delta.clone(),
        )
        return new_global, new, lr0


class FedExp(_Strategy):
    """FedExP (Jhunjhunwala, Wang, Joshi, ICLR 2023, eq. (9)): server extrapolation

        η_g = max(1, Σ_{i=1}^{K} ||Δ_i||² / (2K (||Δ̄||² + ε))),   Δ̄ = (1/K) Σ_i Δ_i
        x_{t+1} = x_t + η_g Δ̄

    with K the clients of this round and the unweighted mean, as in the paper. ``eps``
    defaults to 0 (the paper's small ε guards ||Δ̄|| = 0; here η_g = 1 in that case).
    The paper's optional averaging of the last two iterates for evaluation is not applied.
    """

    name = "fedexp"

    def __init__(self, eps: float = 0.0, lr0: float | None = None):
        super().__init__(lr0)
        if float(eps) < 0:
            raise ConfigError("eps", f"must be >= 0, got {eps!r}")
        self.eps = float(eps)

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
        eta = self.server_lr_for(client_updates, self.eps)
        mean = mean_delta(client_updates)
        lr0 = _resolve_lr0(state, client_updates)
        new = dataclasses.replace(
            state, round=state.round + 1, lr0=lr0, client_lr=lr0, server_lr=eta, last_delta=mean.clone()
        )
        return global_params + eta * mean, new, lr0


class FedHyper(_Strategy):
    """FedHyper (Wang, Wang, Li, ICLR 2024, "FedHyper: A Universal and Robust Learning Rate
    Scheduler for Federated Learning with Hypergradient Descent"), following the authors' code.

    Δ_t = sample-weighted client delta; hypergradient h_t = ⟨Δ_t, Δ_{t−1}⟩ (0 in round 1).

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
      (β reset to 1 each round); the server hands out lr0 and Δ_{t−1} in ``state.last_delta``.
      :meth:`client_beta` binds N and C.
    * ``"decay"`` (baseline): lr_{t+1} = lr0 γ^t, γ = 0.995.

    ``lr0`` is the base client lr; if None, the first round's mean ``local_lr``.
    """

    SERVERS = ("avg", "g", "gm")
    CLIENT_LRS = ("fixed", "sl", "cl", "decay")
    DEFAULT_ALPHA_BOUNDS = {"avg": (-math.inf, math.inf), "g": (-0.8, 4.0), "gm": (-0.2, 4.0)}

    def __init__(
        self,
        server: str = "g",
        client_lr: str = "fixed",
        lr0: float | None = None,
        alpha_bounds: tuple[float, float] | None = None,
        momentum: float = 0.9,
        sl_bounds: tuple[float, float] = (0.001, 0.1),
        decay_gamma: float = 0.995,
        num_clients_total: int = 1,
        fraction: float = 1.0,
        cl_gamma_max: float = 1.1,
        cl_global_scale: float = 0.1,
        cl_bounds: tuple[float, float] = (0.1, 10.0),
    ):
        super().__init__(lr0)
        if server not in self.SERVERS:
            raise ConfigError("server", f"unknown {server!r}; allowed: {', '.join(self.SERVERS)}")
        if client_lr not in self.CLIENT_LRS:
            raise ConfigError("client_lr", f"unknown {client_lr!r}; allowed: {', '.join(self.CLIENT_LRS)}")
        self.server = server
        self.client_lr = client_lr
        self.alpha_bounds = tuple(float(b) for b in (alpha_bounds or self.DEFAULT_ALPHA_BOUNDS[server]))
        self.momentum = float(momentum)
        self.sl_bounds = tuple(float(b) for b in sl_bounds)
        self.decay_gamma = float(decay_gamma)
        self.num_clients_total = int(num_clients_total)
        self.fraction = float(fraction)
        self.cl_gamma_max = float(cl_gamma_max)
        self.cl_global_scale = float(cl_global_scale)
        self.cl_bounds = tuple(float(b) for b in cl_bounds)
        for field, pair in (("alpha_bounds", self.alpha_bounds), ("sl_bounds", self.sl_bounds), ("cl_bounds", self.cl_bounds)):
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ConfigError(field, f"must be a pair [low, high] with low <= high, got {pair!r}")
        if self.num_clients_total <= 0 or not 0.0 < self.fraction <= 1.0:
            raise ConfigError("num_clients_total/fraction", "need num_clients_total >= 1 and 0 < fraction <= 1")
        parts = {"avg": "", "g": "_g", "gm": "_gm"}[server]
        self.name = "fedhyper" + parts + ("" if client_lr == "fixed" else f"_{client_lr}")

    def init(self, global_params):
        m = torch.zeros_like(global_params) if self.server == "gm" else None
        return StrategyState(lr0=self.lr0, client_lr=self.lr0, m=m)

    def aggregate(self, state, global_params, client_updates):
        _check(global_params, client_updates)
        delta = weighted_delta(client_updates)
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
            new_global = global_params + server_lr * delta + self.momentum * alpha * m_prev
            m_new = delta + self.momentum * m_prev

        lr0 = _resolve_lr0(state, client_updates)
        rounds = state.round + 1
        alpha_sl = state.alpha_sl
        if self.client_lr == "sl":
            alpha_sl = alpha_sl + _dot(delta, state.last_delta)
            next_lr = _clip(lr0 * (1.0 + alpha_sl), *self.sl_bounds)
        elif self.client_lr == "decay":
            next_lr = lr0 * self.decay_gamma**rounds
        else:  # fixed, cl (cl clients rescale lr0 per batch themselves)
            next_lr = lr0
        new = dataclasses.replace(
            state, round=rounds, alpha=alpha, alpha_sl=alpha_sl, lr0=lr0, client_lr=next_lr,
            server_lr=server_lr, m=m_new, last_delta=delta.clone(),
        )
        return new_global, new, next_lr

    def client_beta(self, state: StrategyState, beta_prev: float, u_k: torch.Tensor, u_prev: torch.Tensor | None) -> float:
        """:func:`cl_beta` with this strategy's N, C, constants and Δ_{t−1} = ``state.last_delta``."""
        return cl_beta(
            beta_prev, u_k, u_prev, state.last_delta, self.num_clients_total, self.fraction,
            gamma_max=self.cl_gamma_max, global_scale=self.cl_global_scale, bounds=self.cl_bounds,
        )


# --------------------------------------------------------------------------- registry

#: name -> (class, fixed options). Options listed here cannot be overridden by make_strategy.
STRATEGIES: dict[str, tuple[type, dict[str, Any]]] = {
    "fedavg": (FedAvg, {}),
    "fedadam": (FedOpt, {"variant": "adam"}),
    "fedadagrad": (FedOpt, {"variant": "adagrad"}),
    "fedyogi": (FedOpt, {"variant": "yogi"}),
    "fedexp": (FedExp, {}),
    "decay": (FedHyper, {"server": "avg", "client_lr": "decay"}),
    "fedhyper_g": (FedHyper, {"server": "g", "client_lr": "fixed"}),
    "fedhyper_gm": (FedHyper, {"server": "gm", "client_lr": "fixed"}),
    "fedhyper_sl": (FedHyper, {"server": "avg", "client_lr": "sl"}),
    "fedhyper_cl": (FedHyper, {"server": "avg", "client_lr": "cl"}),
    "fedhyper_g_cl": (FedHyper, {"server": "g", "client_lr": "cl"}),
    "fedhyper": (FedHyper, {}),  # free flags: server in {avg, g, gm}, client_lr in {fixed, sl, cl, decay}
}


def _option_names(cls: type) -> list[str]:
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def make_strategy(name: str, **options: Any):
    """Build a strategy from :data:`STRATEGIES` by name; unknown names or options raise ConfigError."""
    if name not in STRATEGIES:
        raise ConfigError("strategy", f"unknown {name!r}; allowed: {', '.join(STRATEGIES)}")
    cls, fixed = STRATEGIES[name]
    allowed = [p for p in _option_names(cls) if p not in fixed]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"strategy.{unknown[0]}", f"unknown option for {name!r}; allowed: {', '.join(allowed)}")
    try:
        return cls(**fixed, **options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"strategy.{name}", str(err).splitlines()[0]) from None
