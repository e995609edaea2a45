"""The ``pbt:`` section: population-based learning-rate adaptation and its fixed-LR baselines.

Schedulers (Ray Tune): ``pbt`` (Jaderberg et al. 2017, "Population Based Training of Neural Networks"),
``pb2`` (Parker-Holder et al. 2020, GP-bandit explore step), and the equal-budget baselines ``random``
(log-uniform fixed learning rates) and ``grid`` (log-spaced fixed learning rates): every scheduler trains
``population`` trials for ``iterations`` x ``steps_per_iteration`` optimizer steps, so budgets match.
PB2 searches ``log10(lr)`` (its GP normalises the bounds linearly, so a linear lr range would propose mostly large
rates); PBT's explore factors act on the lr itself. The baselines train at a constant lr, or (``lr_schedule:
cosine``) decay it to 0 over the trial's budget: the tuned cosine schedule PBT is compared with at equal budget.
``task`` is a built-in task or the researcher's own (``task: my_pkg.tasks:make_task``, :mod:`metaopt.tasks`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from metaopt.config import Seed, StrictModel
from metaopt.errors import ConfigError
from metaopt.extras import require
from metaopt.pbt.commands import REPLAY
from metaopt.registry import Capability
from metaopt.tasks import TaskName, TaskOptimizerSpec, TaskOptions, check_user_task


class PBTSection(StrictModel):
    """Population-based learning-rate adaptation on Ray Tune."""

    task: TaskName = Field(
        default="digits",
        description="Learning problem: a metaopt.tasks name, or your own factory 'module:function' called as "
        "function(options, optimizer, seed) and returning a metaopt.tasks.TrainingTask.",
    )
    task_options: TaskOptions = Field(
        default_factory=dict, validate_default=True, description="Task settings (model size, batch ...)."
    )
    optimizer: TaskOptimizerSpec = Field(
        default_factory=lambda: {"name": "sgd", "momentum": 0.9},
        validate_default=True,
        description="Optimizer spec the task trains with (metaopt.optim; RLlib tasks: {name: adam}).",
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
        default=True,
        description="Asynchronous PBT/PB2: level the population in its last stretch so it finishes together.",
    )
    lr_min: float = Field(default=1e-4, gt=0, description="Smallest learning rate searched.")
    lr_max: float = Field(default=1.0, gt=0, description="Largest learning rate searched.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="Fixed-lr baselines (scheduler random | grid): the trial's lr held constant, or decayed to 0 "
        "along a half cosine over its whole budget (iterations x steps_per_iteration optimizer steps).",
    )
    seed: Seed = Field(default=0, description="Seed for weights, data order and the search.")
    max_failures: int = Field(default=2, ge=0, description="Restarts of a crashed trial from its last checkpoint.")
    checkpoint_interval: int | None = Field(
        default=None, ge=1, description="Iterations between checkpoints (default: perturbation_interval)."
    )

    @field_validator("scheduler")
    @classmethod
    def _pb2_installed(cls, scheduler: str, info: ValidationInfo) -> str:
        if scheduler == "pb2":
            # the field is the scheduler itself; GPy is needed where the sweep runs (not for metaopt submit / list)
            require("pb2", "", info.context)
        return scheduler

    @field_validator("perturbation_factors", mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError("must be a pair of positive multipliers like [1.2, 0.8]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PBTSection:
        if self.lr_min >= self.lr_max:
            raise ConfigError("lr_min", f"must be smaller than lr_max (got lr_min {self.lr_min}, lr_max {self.lr_max})")
        if self.scheduler in ("pbt", "pb2") and self.perturbation_interval > self.iterations:
            raise ConfigError(
                "perturbation_interval",
                f"must be <= iterations so PBT perturbs at all (got {self.perturbation_interval} > {self.iterations})",
            )
        if self.scheduler in ("pbt", "pb2") and self.lr_schedule != "constant":
            raise ConfigError(
                "lr_schedule",
                f"{self.lr_schedule} is for the fixed-lr baselines (scheduler random | grid); {self.scheduler} "
                "sets the lr itself, so lr_schedule must be constant",
            )
        if not all(f > 0 for f in self.perturbation_factors):
            raise ConfigError("perturbation_factors", f"both must be > 0 (got {list(self.perturbation_factors)})")
        return self

    @model_validator(mode="after")
    def _user_task_builds(self, info: ValidationInfo) -> PBTSection:
        # Your own factory is called once here, where the sweep runs, so a wrong return is one line before Ray.
        check_user_task(self.task, self.task_options, self.optimizer, self.seed, info.context)
        return self

    @property
    def checkpoint_every(self) -> int:
        # Checkpoint at perturbation boundaries, not every step (Tune PBT guide): exploit needs exactly those.
        return self.checkpoint_interval or self.perturbation_interval


CAPABILITY = Capability(kind="pbt", section=PBTSection, runner="metaopt.pbt.sweep:run", commands=(REPLAY,))
