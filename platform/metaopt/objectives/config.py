"""The ``lpo:`` and ``lpo_eval:`` sections: meta-training learned RL objectives and evaluating them.

``lpo`` meta-trains a drift function (LPO, Lu et al. 2022; TA-LPO, Jackson et al. ICLR 2024) with OpenAI-ES
(Salimans et al. 2017) through evosax; every population member is a full JAX PPO run on each meta-training
env, and its fitness is the final mean return divided by PPO's on the same env and horizon. ``lpo_eval``
trains PPO with given objectives (built-in ``ppo``/``dpo`` or exported drifts) on held-out envs and horizons.
Nothing here imports JAX, Ray or torch: loading a file stays cheap. Each env's PPO settings are validated by the
models of :mod:`metaopt.objectives.ppo_settings` (the env list, the defaults, :class:`PPOConfig`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from metaopt import user_code
from metaopt.config import Seed, StrictModel, is_file, quote_path
from metaopt.errors import ConfigError
from metaopt.objectives.ppo_settings import EnvName, PPOConfig, PPOOverrides, ppo_config_for
from metaopt.registry import Capability


class EnvSpec(StrictModel):
    """One PPO training problem: an env, its step budget and PPO settings that differ from the env's defaults.

    ``env`` is any gymnax id (``gymnax.registered_envs``) or ``module:function`` naming the user's factory,
    ``make_env() -> (env, env_params)`` with gymnax's interface (:mod:`metaopt.objectives.envs`). Where the
    experiment runs here, a user env is built and stepped once (under ``jax.jit``) before Ray starts.
    """

    env: EnvName = Field(
        description="gymnax environment id (any of gymnax.registered_envs) or 'module:function' naming your env "
        "factory, make_env() -> (env, env_params)."
    )
    total_timesteps: int = Field(ge=1, description="Environment steps of one PPO run (the horizon).")
    ppo: PPOOverrides = Field(
        default_factory=dict, description="PPOSettings that differ from the env's defaults (num_envs, lr, ...)."
    )

    @field_validator("env")
    @classmethod
    def _python_objects_only_from_python(cls, env: str, info: ValidationInfo) -> str:
        # as user_code.user_function: a pickle: object is written by the Python API, never named in a file
        context = info.context
        if env.startswith(user_code.PICKLE_PREFIX) and context is not None and not context.get("python_objects"):
            raise ConfigError("", "a pickle: reference is written by metaopt's Python API; name a 'module:function'")
        return env

    def ppo_config(self, multiplier: float = 1.0, context: dict[str, Any] | None = None) -> PPOConfig:
        """This problem's PPO settings at ``multiplier`` x its budget (a training-horizon multiplier); ``context``:
        the section's validation context (``check_paths`` false: no gymnax lookup, :func:`ppo_config_for`)."""
        steps = horizon_steps(self.total_timesteps, multiplier)
        return ppo_config_for(self.env, context=context, total_timesteps=steps, **self.ppo)

    @model_validator(mode="after")
    def _one_run_fits(self, info: ValidationInfo) -> EnvSpec:
        # what spans settings (minibatches dividing the batch, a budget of at least one update) needs the env's
        # defaults too: build the run's PPOConfig once
        try:
            config = self.ppo_config(context=section_context(info))
        except ConfigError as err:
            raise ConfigError(ppo_field(err.field), err.problem) from None
        context = info.context or {}
        if user_code.is_reference(self.env) and context.get("check_paths"):
            from metaopt.objectives.envs import check_user_env  # JAX: only for a user env, only where it runs

            try:
                check_user_env(config, base=context.get("base"))
            except ConfigError as err:
                raise ConfigError(ppo_field(err.field) if err.field else "env", err.problem) from None
        return self


def section_context(info: ValidationInfo) -> dict[str, Any]:
    """The validation context for the PPOConfigs a section builds: the section's; without one (a section validated
    again inside its Experiment, or built in code) nothing only the run needs is looked up (no gymnax import),
    as paths are not checked then (:func:`metaopt.config.validation_base`)."""
    return info.context if info.context is not None else {"check_paths": False}


def horizon_steps(total_timesteps: int, multiplier: float) -> int:
    """Environment steps of a run at a training-horizon multiplier (at least one)."""
    return max(1, round(total_timesteps * multiplier))


def ppo_field(field: str) -> str:
    """Where a PPOConfig error points inside an env entry: the budget is the entry's own, the rest its ``ppo``."""
    return field if field == "total_timesteps" else f"ppo.{field}"


class ESConfig(StrictModel):
    """OpenAI-ES settings (evosax ``Open_ES``): antithetic sampling, fitness shaping, Adam on the mean."""

    population: int = Field(default=16, ge=2, le=65536, description="Members per generation (even).")
    generations: int = Field(default=100, ge=1, description="Generations = Tune iterations.")
    sigma_init: float = Field(default=0.03, gt=0, description="Initial perturbation std.")
    sigma_decay: float = Field(default=0.999, gt=0, le=1, description="Multiplicative std decay per generation.")
    sigma_min: float = Field(default=0.01, gt=0, description="Floor of the std.")
    lr: float = Field(default=0.01, gt=0, description="Adam learning rate on the ES mean.")
    lr_decay: float = Field(default=0.999, gt=0, le=1, description="Multiplicative lr decay per generation.")
    lr_min: float = Field(default=0.001, gt=0, description="Floor of the lr.")
    antithetic: bool = Field(default=True, description="Mirrored sampling: member i pairs with i + N/2.")
    fitness_shaping: Literal["centered_rank", "standardize", "raw"] = Field(
        default="centered_rank", description="How raw fitness becomes ES weights."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ESConfig:
        if self.antithetic and self.population % 2:
            raise ConfigError("population", f"must be even with antithetic sampling (got {self.population})")
        if self.sigma_min > self.sigma_init:
            raise ConfigError("sigma_min", f"must be <= sigma_init ({self.sigma_min} > {self.sigma_init})")
        if self.lr_min > self.lr:
            raise ConfigError("lr_min", f"must be <= lr ({self.lr_min} > {self.lr})")
        return self


def positive_horizons(cls, horizons: list[float]) -> list[float]:
    """Horizon multipliers scale an env's total_timesteps: each must be > 0."""
    if any(h <= 0 for h in horizons):
        raise ValueError(f"every horizon multiplier must be > 0 (got {horizons})")
    return horizons


def check_horizons(envs: list[EnvSpec], horizons: list[float], context: dict[str, Any] | None = None) -> None:
    """Every env's PPO run at every horizon multiplier must hold at least one update: a ConfigError naming the
    env's entry and the horizon otherwise (multiplier 1 is each EnvSpec's own check)."""
    for i, spec in enumerate(envs):
        for multiplier in horizons:
            if multiplier == 1.0:
                continue
            try:
                spec.ppo_config(multiplier, context)
            except ConfigError as err:
                steps = horizon_steps(spec.total_timesteps, multiplier)
                raise ConfigError(
                    f"envs.{i}.{ppo_field(err.field)}",
                    f"{err.problem} (horizon {multiplier:g} x {spec.total_timesteps} = {steps} steps)",
                ) from None


class LPOSection(StrictModel):
    """Meta-train a drift (learned PPO objective) with evolution strategies, one Tune trial per meta-seed."""

    drift: Literal["lpo", "ta_lpo"] = Field(default="lpo", description="Which learned drift to meta-train.")
    hidden: int = Field(default=128, ge=1, le=4096, description="Tanh units of the drift network.")
    time_inputs: Literal["fraction", "fraction_and_log_horizon"] = Field(
        default="fraction",
        description="ta_lpo's temporal inputs: 'fraction' = [x, (n/N)*x] (Jackson et al. 2024, eq. 10); "
        "'fraction_and_log_horizon' adds log(N)*x, for meta-training over several horizons.",
    )
    envs: list[EnvSpec] = Field(min_length=1, description="Meta-training problems; fitness averages over them.")
    horizons: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="Training-horizon multipliers of each env's total_timesteps, one drawn per env per generation.",
    )
    es: ESConfig = Field(default_factory=ESConfig)
    seeds_per_member: int = Field(default=1, ge=1, description="PPO seeds averaged into each member's fitness.")
    baseline_seeds: int = Field(default=4, ge=1, description="PPO seeds for the reference return per env/horizon.")
    eval_every: int = Field(default=10, ge=1, description="Generations between evaluations of the ES mean.")
    eval_seeds: int = Field(default=4, ge=1, description="Seeds of each ES-mean evaluation.")
    checkpoint_every: int = Field(default=5, ge=1, description="Generations between checkpoints of the ES state.")
    workers: int = Field(
        default=0, ge=0, description="Ray actors the population is split over (0: vmap inside the trial)."
    )
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each population worker reserves.")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs each population worker reserves.")
    meta_seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, description="One trial per seed.")
    max_failures: int = Field(default=2, ge=0, description="Restarts of a crashed trial from its checkpoint.")

    _positive_horizons = field_validator("horizons")(positive_horizons)

    @field_validator("meta_seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError(f"must be distinct non-negative integers (got {seeds})")
        return seeds

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> LPOSection:
        if self.workers and self.es.population % self.workers:
            raise ConfigError(
                "workers", f"must divide es.population ({self.es.population} members over {self.workers} workers)"
            )
        envs = [spec.env for spec in self.envs]
        if len(set(envs)) != len(envs):
            raise ConfigError("envs", f"each env once (got {envs}); use horizons for several budgets")
        if self.drift == "lpo" and len(self.horizons) > 1:
            raise ConfigError(
                "horizons", "several horizons only matter for ta_lpo (LPO cannot see the horizon); give one"
            )
        if self.drift == "lpo" and self.time_inputs != "fraction":
            raise ConfigError("time_inputs", "only ta_lpo sees time; leave it out for lpo")
        check_horizons(self.envs, self.horizons, section_context(info))
        if self.time_inputs == "fraction_and_log_horizon":
            check_log_horizon_varies(self.envs, self.horizons)
        problem_clip(self.envs, section_context(info))
        return self

    def drift_options(self) -> tuple[tuple[str, Any], ...]:
        """The drift's options as meta-training builds (and exports) it: ``clip_eps`` is the problems' PPO clip
        (:func:`problem_clip`), so the network at zero is the PPO baseline's drift (Lu et al. 2022, Sec. 4)."""
        options: tuple[tuple[str, Any], ...] = (
            ("clip_eps", problem_clip(self.envs, {"check_paths": False})),
            ("hidden", self.hidden),
        )
        if self.drift == "ta_lpo":
            return (*options, ("time_inputs", self.time_inputs))
        return options


def problem_clip(envs: list[EnvSpec], context: dict[str, Any] | None = None) -> float:
    """The PPO clip ``clip_eps`` shared by every meta-training env (Schulman et al. 2017, eq. 7): the clip of the
    learned drift's inner PPO term, ``relu(net(x) + D_ppo(r, A) - 1e-4)`` (Lu et al. 2022, Sec. 4), equal to the
    PPO baseline's. One drift has one clip: envs with different clips are one ConfigError line."""
    clips = {i: float(spec.ppo_config(context=context).clip_eps) for i, spec in enumerate(envs)}
    if len(set(clips.values())) > 1:
        found = ", ".join(f"envs.{i}: {clip:g}" for i, clip in clips.items())
        raise ConfigError(
            "envs", f"every env needs the same ppo.clip_eps (the learned drift's inner PPO clip); got {found}"
        )
    clip = clips[0]
    if not clip < 1:
        raise ConfigError("envs.0.ppo.clip_eps", f"the learned drift's PPO clip must be < 1 (got {clip:g})")
    return clip


def check_log_horizon_varies(envs: list[EnvSpec], horizons: list[float]) -> None:
    """``time_inputs: fraction_and_log_horizon`` feeds ``log(N)*x`` (N: a run's env steps); with one N over all
    envs and horizons that input is a constant multiple of ``x`` and adds nothing: one ConfigError line."""
    budgets = {horizon_steps(spec.total_timesteps, h) for spec in envs for h in horizons}
    if len(budgets) < 2:
        raise ConfigError(
            "time_inputs",
            f"fraction_and_log_horizon needs several horizons or env budgets (every run has N = {budgets.pop()} "
            "env steps, so log N is constant); give several horizons or use fraction",
        )


class LPOEvalSection(StrictModel):
    """Train PPO with each objective on held-out envs and horizons; report mean and confidence interval."""

    objectives: list[str] = Field(
        default_factory=lambda: ["ppo", "dpo"],
        min_length=1,
        description="ppo, dpo, a directory holding an exported drift (drift.json), or mlflow:RUN_ID.",
    )
    envs: list[EnvSpec] = Field(min_length=1, description="Held-out problems.")
    horizons: list[float] = Field(default_factory=lambda: [1.0], min_length=1, description="Horizon multipliers.")
    seeds: int = Field(default=8, ge=2, description="PPO seeds per objective, env and horizon.")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Level of the interval on the mean return.")
    heatmap_progress: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0], description="Training-progress values of the drift heat-maps."
    )
    seed: Seed = Field(default=0, description="First PPO seed.")

    _positive_horizons = field_validator("horizons")(positive_horizons)

    @field_validator("heatmap_progress")
    @classmethod
    def _unit_interval(cls, values: list[float]) -> list[float]:
        if any(not 0 <= v <= 1 for v in values):
            raise ValueError(f"training-progress values must lie in [0, 1] (got {values})")
        return values

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, objectives: list[str]) -> list[str]:
        # exported drift directories stay as written: the driver reads them (evaluate.resolve_objective), and
        # they are the objectives' labels in tables and metrics
        if len(set(objectives)) != len(objectives):
            raise ValueError("each objective once")
        return objectives

    @model_validator(mode="after")
    def _runs_fit(self, info: ValidationInfo) -> LPOEvalSection:
        check_horizons(self.envs, self.horizons, section_context(info))
        return self

    def check(self) -> None:
        from pathlib import Path

        for spec in self.objectives:
            if spec in ("ppo", "dpo") or spec.startswith("mlflow:"):
                continue
            if not is_file(Path(spec).expanduser() / "drift.json"):
                raise ConfigError(
                    "objectives",
                    f"{quote_path(spec)} is not ppo, dpo, mlflow:RUN_ID or a directory holding drift.json "
                    "(an exported drift)",
                )
            from metaopt.objectives.export import read_drift

            try:
                read_drift(Path(spec).expanduser())  # format, shapes and values of the exported drift
            except (OSError, ValueError) as err:
                raise ConfigError("objectives", f"{quote_path(spec)}: {str(err).splitlines()[0]}") from None


CAPABILITY = Capability(kind="lpo", section=LPOSection, runner="metaopt.objectives.sweep:run_meta_training")
EVAL_CAPABILITY = Capability(kind="lpo_eval", section=LPOEvalSection, runner="metaopt.objectives.evaluate:run")
