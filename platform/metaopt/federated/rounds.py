"""One federated training, round by round (McMahan et al. 2017; FedHyper, Wang et al. ICLR 2024):

1. sample a fraction C of the clients (seeded);
2. send them the global model and this round's local lr (the strategy's: fixed, decayed, FedHyper-SL's, or
   lr0 with FedHyper-CL's per-batch multiplier computed on the client);
3. collect Δ_i from every client that answers by the round's one deadline (``timeout_s``, from the round's
   start, for all clients at once); a client that failed or was late is left out and the round completes with
   the others. The clients are a pool (:class:`metaopt.federated.clients.Clients`): in-process objects, or Ray
   actors whose deaths, restarts and cancelled round tasks the pool handles -- this loop knows no Ray;
4. aggregate with the server strategy (:mod:`metaopt.federated.strategies`), evaluate the new global model on
   the union of the clients' validation shards, and report accuracy, loss, global and local lrs.

:meth:`FederatedRun.state_dict` / :meth:`load_state_dict` hold everything a resumed run needs (global model,
strategy state, round, sampler state), so a run checkpointed each round resumes with no lost round.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metaopt.errors import ConfigError
from metaopt.federated.clients import Clients, LocalResult, build_model, evaluate, flat_params
from metaopt.federated.data import ClientShard
from metaopt.federated.strategies import ClientUpdate, StrategyState


@dataclass(frozen=True)
class RoundSettings:
    fraction: float = 1.0  # C: share of clients sampled per round
    epochs: int = 1  # E: local epochs
    lr0: float = 0.05  # initial local lr
    optimizer: str = "sgd"
    momentum: float = 0.0  # the clients' SGD momentum (FedHyper's code: 0.5)
    batch_size: int = 32
    seed: int = 0
    timeout_s: float = 600.0  # the round's deadline: clients that have not answered by then are left out of it
    restart_wait_s: float = 60.0  # how long a round waits for a client Ray is restarting after a failure

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError("round_timeout_s", f"must be a finite number of seconds > 0 (got {self.timeout_s!r})")


def _cl_rule(strategy, state: StrategyState, beta_prev, u_k, u_prev, step):
    """FedHyper-CL's per-batch lr multiplier, evaluated on the client with this round's server state."""
    return strategy.client_beta(state, beta_prev, u_k, u_prev)


class FederatedRun:
    """The server side of one federated training over a pool of ``clients`` (in-process or Ray actors)."""

    def __init__(
        self,
        shards: list[ClientShard],
        clients: Clients,
        strategy,
        settings: RoundSettings,
        input_shape: int | tuple[int, ...],
        num_classes: int,
        hidden: tuple[int, ...] = (64,),
        model: str = "mlp",
    ):
        self.clients = clients
        self.strategy = strategy
        self.settings = settings
        torch.manual_seed(settings.seed)
        self.model = build_model(input_shape, num_classes, hidden, model)  # the global model, as the clients'
        self.global_params = flat_params(self.model)
        self.state = strategy.init(self.global_params)
        self.client_lr = settings.lr0
        self.round = 0
        self.rng = np.random.default_rng(settings.seed)
        self.val_x = torch.cat([s.val_x for s in shards])
        self.val_y = torch.cat([s.val_y for s in shards])

    def sample(self) -> list[int]:
        count = max(1, round(self.settings.fraction * len(self.clients)))
        return sorted(self.rng.choice(len(self.clients), size=count, replace=False).tolist())

    def _lr_rule(self):
        if getattr(self.strategy, "client_lr", None) == "cl":  # FedHyper-CL
            return functools.partial(_cl_rule, self.strategy, self.state)
        return None

    def _collect(self, chosen: list[int], lr: float) -> tuple[list[LocalResult], list[int]]:
        settings = {
            "round_index": self.round,
            "epochs": self.settings.epochs,
            "lr": lr,
            "optimizer": self.settings.optimizer,
            "momentum": self.settings.momentum,
            "batch_size": self.settings.batch_size,
            "lr_rule": self._lr_rule(),
        }
        answers = self.clients.train_round(
            chosen,
            self.global_params,
            settings,
            timeout_s=self.settings.timeout_s,
            restart_wait_s=self.settings.restart_wait_s,
        )
        return answers.results, answers.failed

    def run_round(self) -> dict[str, Any]:
        started = time.perf_counter()
        chosen = self.sample()
        lr = self.client_lr
        results, failed = self._collect(chosen, lr)
        if results:
            updates = [ClientUpdate(r.delta, r.num_samples, r.local_lr) for r in results]
            self.global_params, self.state, next_lr = self.strategy.aggregate(self.state, self.global_params, updates)
            self.client_lr = float(next_lr)
        self.round += 1
        metrics = evaluate(self.model, self.strategy.evaluated(self.state, self.global_params), self.val_x, self.val_y)
        used = [x for r in results for x in r.lrs_used]
        base_lr = self.state.lr0 if self.state.lr0 is not None else self.settings.lr0
        return {
            "round": self.round,
            "accuracy": metrics["accuracy"],
            "loss": metrics["loss"],
            "global_lr": float(self.state.server_lr),
            "client_lr": lr,
            "client_lr_mean_used": float(np.mean(used)) if used else float("nan"),
            "client_lr_max_used": float(np.max(used)) if used else float("nan"),
            # the client lr over lr0: SL's / decay's schedule and CL's mean beta_k (global_lr: FedHyper's 1 + a)
            "client_lr_factor": float(np.mean(used)) / base_lr if used else float("nan"),
            "participants": len(results),
            "failed_clients": len(failed),
            "failed_ids": failed,
            "train_loss": float(np.mean([r.train_loss for r in results])) if results else float("nan"),
            "round_seconds": time.perf_counter() - started,
        }

    def set_initial_lr(self, lr: float) -> None:
        """A new initial local lr (PBT's explore step): the strategy's lr0 and this round's client lr."""
        import dataclasses

        self.state = dataclasses.replace(self.state, lr0=lr, client_lr=lr)
        self.client_lr = lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_params": self.global_params.clone(),
            "strategy": self.state.to_dict(),
            "round": self.round,
            "client_lr": self.client_lr,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.global_params = saved["global_params"].clone()
        self.state = StrategyState.from_dict(saved["strategy"])
        self.round = int(saved["round"])
        self.client_lr = float(saved["client_lr"])
        self.rng.bit_generator.state = saved["rng"]
