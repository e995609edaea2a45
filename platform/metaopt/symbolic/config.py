"""The ``symbolic:`` section: regularized evolution of optimizer programs (Chen et al. 2023).

The search starts from the AdamW program (or a program file), mutates programs (insert / delete / modify),
scores each on a proxy task (validation metric after ``steps`` optimizer steps, best of a few learning-rate
multipliers), keeps a population with tournament selection and ageing (Real et al. 2019), reseeds the whole
population from the start program every ``restart_every`` iterations (exploration) and from the best after
``restart_after`` iterations without a new best (exploitation, Chen et al. 2023, Sec. 2), and sends its top programs
through a funnel of larger proxies and a held-out meta-validation task before accepting them. Nothing here imports
torch or Ray.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from metaopt.config import Seed, StrictModel
from metaopt.errors import ConfigError
from metaopt.registry import Capability
from metaopt.symbolic.program_files import absolute_program
from metaopt.tasks import PROBE_OPTIMIZER, MetaoptOptimizerTaskName, TaskOptions, check_user_task


class ProxySpec(StrictModel):
    """One proxy: a metaopt task trained with the program for ``steps`` steps at each lr multiplier.

    ``task`` may be the researcher's own factory (``my_pkg.tasks:make_task``, :mod:`metaopt.tasks`): it is given
    each candidate program as its optimizer spec and must build it with ``metaopt.optim.build_optimizer``."""

    task: MetaoptOptimizerTaskName = Field(
        default="digits", description="metaopt task to train, or your own factory 'module:function'."
    )
    task_options: TaskOptions = Field(
        default_factory=dict, validate_default=True, description="Task settings (model size, batch)."
    )
    steps: int = Field(default=200, ge=1, description="Optimizer steps per evaluation.")
    lrs: list[float] = Field(
        default_factory=lambda: [0.3, 1.0, 3.0],
        min_length=1,
        description="lr values tried; the program's own constants scale them (AdamW's lr * 0.001).",
    )
    seeds: int = Field(default=1, ge=1, description="Training seeds averaged per lr.")

    @field_validator("lrs")
    @classmethod
    def _positive(cls, lrs: list[float]) -> list[float]:
        if any(lr <= 0 for lr in lrs):
            raise ValueError(f"every lr must be > 0 (got {lrs})")
        return lrs

    @model_validator(mode="after")
    def _user_task_builds(self, info: ValidationInfo) -> ProxySpec:
        # Your own factory is built once here (with AdamW standing in for the programs, which any metaopt.optim
        # optimizer must be able to), so a wrong return is one line before Ray starts.
        check_user_task(self.task, self.task_options, PROBE_OPTIMIZER, 0, info.context)
        return self


class SymbolicSection(StrictModel):
    """Search optimizer programs by regularized evolution on Ray; one Tune trial per search seed."""

    start: str = Field(default="adamw", description="adamw, lion, or a path to a program text file.")
    population: int = Field(default=32, ge=2, description="Programs kept alive (paper: 1,000).")
    tournament: int = Field(default=2, ge=1, description="Tournament size for parent selection (paper: 2).")
    evaluations: int = Field(default=200, ge=1, description="Programs scored in total (the search budget).")
    batch: int = Field(default=4, ge=1, description="Children scored in parallel per Tune iteration.")
    workers: int = Field(default=0, ge=0, description="Ray actors scoring programs (0: in the trial's process).")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each scoring worker reserves.")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs each scoring worker reserves (GPU proxies).")
    restart_every: int = Field(
        default=0,
        ge=0,
        description="Every that many iterations, reseed the population with mutants of the start program "
        "(0: never; else >= 2).",
    )
    restart_after: int = Field(
        default=0,
        ge=0,
        description="Iterations without a new best, then reseed the population with mutants of the best "
        "(0: never; else >= 2).",
    )
    proxy: ProxySpec = Field(default_factory=ProxySpec, description="The search proxy.")
    funnel: list[ProxySpec] = Field(default_factory=list, description="Larger proxies a top program must pass.")
    meta_validation: ProxySpec | None = Field(
        default=None, description="Held-out task (e.g. tiny_lm) an accepted program must also pass."
    )
    funnel_top: int = Field(default=3, ge=1, description="Best programs (by proxy score) sent through the funnel.")
    margin: float = Field(default=0.0, description="Score a program must beat the start program by, per stage.")
    checkpoint_every: int = Field(default=5, ge=1, description="Iterations between checkpoints of the search.")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, description="One trial per search seed.")
    max_failures: int = Field(default=2, ge=0, description="Restarts of a crashed trial from its checkpoint.")

    @field_validator("start")
    @classmethod
    def _absolute_start_file(cls, start: str, info) -> str:
        return absolute_program(start, info)  # trials run in folders of their own

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "restart_from_start_probability" in data:
            raise ConfigError(
                "restart_from_start_probability",
                "removed: restarts now follow Chen et al. 2023; set restart_every (periodic, from the start "
                "program) and/or restart_after (plateau, from the best)",
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SymbolicSection:
        for name in ("restart_every", "restart_after"):
            if getattr(self, name) == 1:
                # every iteration a restart: the population is reseeded around one program and never evolves
                raise ConfigError(name, "must be 0 (off) or >= 2 (1 would reseed the population every iteration)")
        if self.tournament > self.population:
            raise ConfigError("tournament", f"must be <= population ({self.tournament} > {self.population})")
        if self.workers and self.batch % self.workers:
            raise ConfigError("batch", f"must be a multiple of workers ({self.batch} over {self.workers} workers)")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError("seeds", f"must be distinct non-negative integers (got {self.seeds})")
        return self

    def check(self) -> None:
        """The start program through the program parser (task options are checked by their fields)."""
        from metaopt.symbolic.search import load_start_program

        load_start_program(self.start)


CAPABILITY = Capability(
    kind="symbolic",
    section=SymbolicSection,
    runner="metaopt.symbolic.sweep:run_search",
    provides=("metaopt.symbolic.optimizer:register",),  # the ``program`` optimizer, for every kind's optimizer specs
)
