"""The ``pbt:`` section: population-based learning-rate adaptation and its fixed-LR baselines.

Schedulers (Ray Tune): ``pbt`` (Jaderberg et al. 2017, "Population Based Training of Neural Networks"),
``pb2`` (Parker-Holder et al. 2020, GP-bandit explore step), and the equal-budget baselines ``random``
(log-uniform fixed learning rates) and ``grid`` (log-spaced fixed learning rates): every scheduler trains
``population`` trials for ``iterations`` x ``steps_per_iteration`` optimizer steps, so budgets match.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from metaopt.config import Seed, StrictModel, absolute_program_spec, register_kind
from metaopt.errors import ConfigError

TASKS = ("digits", "cartpole_rllib")
SCHEDULERS = ("pbt", "pb2", "random", "grid")


class PBTSection(StrictModel):
    """Population-based learning-rate adaptation on Ray Tune."""

    task: Literal["digits", "cartpole_rllib"] = Field(default="digits", description="Learning problem.")
    task_options: dict[str, Any] = Field(default_factory=dict, description="Task settings (model size, batch ...).")
    optimizer: dict[str, Any] = Field(
        default_factory=lambda: {"name": "sgd", "momentum": 0.9}, description="metaopt.optim optimizer spec."
    )
    scheduler: Literal["pbt", "pb2", "random", "grid"] = Field(default="pbt", description="Tune scheduler/search.")
    population: int = Field(default=4, ge=2, le=4096, description="Trials in the population.")
    iterations: int = Field(default=20, ge=1, description="Tune iterations per trial.")
    steps_per_iteration: int = Field(default=100, ge=1, description="Optimizer steps per Tune iteration.")
    perturbation_interval: int = Field(default=4, ge=1, description="Iterations between exploit/explore steps.")
    quantile_fraction: float = Field(default=0.25, gt=0, le=0.5, description="Bottom/top fraction exploited.")
    resample_probability: float = Field(default=0.25, ge=0, le=1, description="Chance to resample lr on explore.")
    perturbation_factors: tuple[float, float] = Field(default=(1.2, 0.8), description="lr multipliers on explore.")
    synch: bool = Field(default=False, description="Synchronous PBT (all trials perturb together).")
    even_finish: bool = Field(
        default=True, description="Asynchronous PBT/PB2: level the population in its last stretch so it finishes together."
    )
    lr_min: float = Field(default=1e-4, gt=0, description="Smallest learning rate searched.")
    lr_max: float = Field(default=1.0, gt=0, description="Largest learning rate searched.")
    seed: Seed = Field(default=0, description="Seed for weights, data order and the search.")
    max_failures: int = Field(default=2, ge=0, description="Restarts of a crashed trial from its last checkpoint.")
    checkpoint_interval: int | None = Field(
        default=None, ge=1, description="Iterations between checkpoints (default: perturbation_interval)."
    )

    @field_validator("optimizer")
    @classmethod
    def _absolute_program_file(cls, spec: dict[str, Any], info) -> dict[str, Any]:
        return absolute_program_spec(spec, info)  # trials run in folders of their own

    @field_validator("perturbation_factors", mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError("must be a pair of positive multipliers like [1.2, 0.8]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "PBTSection":
        if self.lr_min >= self.lr_max:
            raise ConfigError("lr_min", f"must be smaller than lr_max (got lr_min {self.lr_min}, lr_max {self.lr_max})")
        if self.scheduler in ("pbt", "pb2") and self.perturbation_interval > self.iterations:
            raise ConfigError(
                "perturbation_interval",
                f"must be <= iterations so PBT perturbs at all (got {self.perturbation_interval} > {self.iterations})",
            )
        if not all(f > 0 for f in self.perturbation_factors):
            raise ConfigError("perturbation_factors", f"both must be > 0 (got {list(self.perturbation_factors)})")
        return self

    def check(self) -> None:
        """Validate the optimizer spec and the task's options with the code that will use them."""
        # Field names are relative to this section; config.from_dict prefixes "pbt.".
        if self.task == "digits":
            from metaopt.optim import resolve_optimizer_spec
            from metaopt.tasks.digits import DigitsOptions

            DigitsOptions.parse(self.task_options, field="task_options")
            resolve_optimizer_spec(self.optimizer)
        elif self.task == "cartpole_rllib":
            from metaopt.tasks.rllib_ppo import PPOOptions, check_optimizer

            PPOOptions.parse(self.task_options, field="task_options")
            check_optimizer(self.optimizer, field="optimizer")

    @property
    def checkpoint_every(self) -> int:
        # Checkpoint at perturbation boundaries, not every step (Tune PBT guide): exploit needs exactly those.
        return self.checkpoint_interval or self.perturbation_interval


register_kind("pbt", PBTSection, "metaopt.pbt.sweep:run")
