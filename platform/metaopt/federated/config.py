"""The ``federated:`` section: federated trainings as Tune trials, strategies x initial lrs x seeds.

Each trial is one federated training (Wang et al. ICLR 2024, FedHyper, and its baselines) with its clients as
Ray actors; one Tune iteration is one round. Nothing here imports torch or Ray.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from metaopt.config import Seed, StrictModel, absolute_path, quote, register_kind
from metaopt.errors import ConfigError

STRATEGY_NAMES = (
    "fedavg", "fedadam", "fedadagrad", "fedyogi", "fedexp", "decay", "fedhyper_g", "fedhyper_gm", "fedhyper_sl",
    "fedhyper_cl", "fedhyper_g_cl",
)


class FederatedSection(StrictModel):
    """Federated learning with adaptive server/client learning rates; clients are Ray actors."""

    dataset: Literal["digits", "synthetic", "fashion_mnist", "cifar10"] = Field(default="digits")
    data_root: str | None = Field(default=None, description="Directory of fashion_mnist / cifar10 files.")
    num_clients: int = Field(default=10, ge=1, description="Clients (each a Ray actor with its own shard).")
    partition: Literal["iid", "dirichlet"] = Field(default="dirichlet")
    alpha: float = Field(default=0.5, description="Dirichlet concentration of the label skew (> 0).")
    fraction: float = Field(default=1.0, description="C: share of clients sampled per round, in (0, 1].")
    rounds: int = Field(default=30, ge=1, description="Federated rounds = Tune iterations.")
    local_epochs: int = Field(default=1, ge=1, description="E: local epochs per round.")
    client_optimizer: Literal["sgd", "adam"] = Field(default="sgd")
    batch_size: int = Field(default=32, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [64], description="MLP hidden widths.")
    val_fraction: float = Field(default=0.2, gt=0, lt=1, description="Share of each client's data for validation.")
    strategies: list[str] = Field(default_factory=lambda: ["fedavg", "fedhyper_g"], min_length=1)
    lrs: list[float] = Field(default_factory=lambda: [0.05], min_length=1, description="Initial local lrs swept.")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    cpus_per_client: float = Field(default=0.1, gt=0, description="CPUs each client actor reserves.")
    gpus_per_client: float = Field(default=0.0, ge=0, description="GPUs each client actor reserves.")
    scheduler: Literal["grid", "pbt"] = Field(
        default="grid", description="grid: every strategy x lr x seed; pbt: PBT also adapts the initial local lr."
    )
    pbt_interval: int = Field(default=5, ge=1, description="Rounds between PBT exploit/explore steps.")
    max_failures: int = Field(default=2, ge=0, description="Restarts of a crashed trial from its last round.")
    round_timeout_s: float = Field(
        default=600.0, gt=0, allow_inf_nan=False,
        description="One deadline per round (s): clients that have not answered by then are left out of it.",
    )

    @field_validator("data_root")
    @classmethod
    def _absolute_data_root(cls, root: str | None, info) -> str | None:
        # made absolute against where the user ran (trials run in folders of their own) and checked there
        return None if root is None else absolute_path(root, info, directory=True, what="the dataset's files")

    @field_validator("alpha")
    @classmethod
    def _positive_alpha(cls, alpha: float) -> float:
        if alpha <= 0:
            raise ValueError(f"must be > 0 (got {alpha}); small alpha = strong label skew")
        return alpha

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, fraction: float) -> float:
        if not 0 < fraction <= 1:
            raise ValueError(f"must be in (0, 1] (got {fraction})")
        return fraction

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, strategies: list[str]) -> list[str]:
        for name in strategies:
            if name not in STRATEGY_NAMES:
                raise ValueError(f"unknown strategy {quote(name)}; allowed: {', '.join(STRATEGY_NAMES)}")
        return strategies

    @field_validator("lrs")
    @classmethod
    def _positive_lrs(cls, lrs: list[float]) -> list[float]:
        if any(lr <= 0 for lr in lrs):
            raise ValueError(f"every lr must be > 0 (got {lrs})")
        return lrs

    @model_validator(mode="after")
    def _consistent(self) -> "FederatedSection":
        if self.scheduler == "pbt" and self.pbt_interval >= self.rounds:
            raise ConfigError("pbt_interval", f"must be < rounds so PBT perturbs at all ({self.pbt_interval} >= {self.rounds})")
        if self.dataset in ("fashion_mnist", "cifar10") and not self.data_root:
            raise ConfigError("data_root", f"{self.dataset} is read from a local directory; set data_root")
        return self

    def check(self) -> None:
        """The dataset size decides how many clients it can feed (train + validation each). Local datasets are
        checked when the run starts (a file submitted to a cluster names a path on the cluster, not here)."""
        samples = {"digits": 1797, "synthetic": 4000}.get(self.dataset)
        if samples is not None and 2 * self.num_clients > samples:
            raise ConfigError("num_clients", f"{self.num_clients} clients need at least {2 * self.num_clients} "
                              f"samples (train + validation each); {self.dataset} has {samples}")


register_kind("federated", FederatedSection, "metaopt.federated.sweep:run")
