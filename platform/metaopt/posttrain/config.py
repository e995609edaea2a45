"""The ``posttrain:`` section: GRPO post-training of a language-model policy with a curriculum, as Tune trials.

Each trial is one post-training run (GRPO, Shao et al. 2024) of one curriculum x seed; one Tune iteration is
``steps_per_iteration`` GRPO steps. The curriculum (uniform, easy->hard, hard->easy, or the Self-Evolving
Curriculum of Chen et al. 2025) picks the problem category of every prompt. The problems are built-in or
reasoning-gym ``tasks``, or the researcher's own ``dataset`` (a JSONL file, its categories from a column, scored by
their own ``reward`` function). Nothing here imports torch or Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from metaopt.config import Seed, StrictModel, absolute_path, quote, quote_path, validation_base
from metaopt.errors import ConfigError
from metaopt.optim import OptimizerSpec, OptionalScheduleSpec
from metaopt.posttrain.curriculum import CURRICULUM_NAMES, SECAlpha, SECTau
from metaopt.posttrain.dataset import DatasetSpec, read_dataset
from metaopt.posttrain.rewards import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S
from metaopt.posttrain.tasks import TASK_LEVELS, Levels, TaskSpec, each_task_once, evaluating_gym_task
from metaopt.registry import Capability


class ModelSpec(StrictModel):
    """The policy: a local Hugging Face checkpoint (``path``) or a tiny model built from this config."""

    path: str | None = Field(default=None, description="Local directory of a causal LM + tokenizer (no download).")
    arch: Literal["qwen2", "gpt2"] = Field(default="qwen2", description="Architecture of the tiny model.")
    hidden: int = Field(default=64, ge=8, description="Hidden width of the tiny model.")
    layers: int = Field(default=2, ge=1, description="Transformer blocks of the tiny model.")
    heads: int = Field(default=4, ge=1, description="Attention heads of the tiny model.")
    max_positions: int = Field(default=128, ge=16, description="Context length of the tiny model.")
    chat_template: bool | Literal["auto"] = Field(
        default="auto",
        description="Prompt as a user turn of the local model's chat template (auto: when its tokenizer has one).",
    )

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, path: str | None, info) -> str | None:
        # made absolute against where the user ran (trials run in folders of their own) and checked there
        return (
            None
            if path is None
            else absolute_path(
                path,
                info,
                directory=True,
                what="a local Hugging Face checkpoint (config.json, weights, tokenizer files)",
            )
        )

    @model_validator(mode="after")
    def _heads_divide(self, info: ValidationInfo) -> ModelSpec:
        if self.path is None and self.hidden % self.heads:
            raise ConfigError("heads", f"must divide hidden ({self.hidden} % {self.heads} != 0)")
        if self.chat_template is True and self.path is None:
            raise ConfigError("chat_template", "needs model.path: a model built from this config has no template")
        if self.chat_template is True and validation_base(info)[1] and not has_chat_template(Path(self.path)):
            raise ConfigError("chat_template", f"is true but the tokenizer in {quote_path(self.path)} has none")
        return self


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer saved in ``model_dir`` has a chat template (``chat_template.jinja``, or the key in
    ``tokenizer_config.json``), read without importing transformers."""
    if (model_dir / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


class SectionTask(TaskSpec):
    """A task of the section (:class:`~metaopt.posttrain.tasks.TaskSpec`); levels 1-3 of a levelled task where none
    are written."""

    levels: Levels | None = Field(default=None, min_length=1, description="Difficulty levels (default 1-3).")

    @model_validator(mode="before")
    @classmethod
    def _default_levels(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("levels") is None and data.get("name") in TASK_LEVELS:
            return {**data, "levels": [1, 2, 3]}
        return data


def _default_tasks() -> list[dict[str, Any]]:
    return [{"name": "arithmetic", "levels": [1, 2, 3, 4, 5]}]


class CurriculumSpec(StrictModel):
    """SEC's options for the ``sec`` trials (alpha = TD(0) step, tau = Boltzmann temperature; bounds from
    :class:`~metaopt.posttrain.curriculum.SECOptions`), and, for every curriculum, when it is updated relative to
    the next draw under overlapped rollouts (``update``)."""

    alpha: SECAlpha = Field(default=0.5, description="SEC: TD(0) learning rate of the category values.")
    tau: SECTau = Field(default=0.2, description="SEC: Boltzmann temperature over category values.")
    update: Literal["before_next_draw", "overlapped"] = Field(
        default="before_next_draw",
        description="With roles.overlap: before_next_draw (the paper's order) updates the curriculum with step t's "
        "rewards before drawing step t+1's prompts; overlapped draws them as soon as step t's batch is in, one "
        "update behind (the rollouts never wait for the scorer).",
    )


LossAggregation = Literal["sequence_mean", "token_mean"]
"""grpo.LOSS_AGGREGATIONS, written out so this module does not import torch (a test keeps the two equal)."""


class GRPOSpec(StrictModel):
    """Group Relative Policy Optimization settings (Shao et al. 2024, eq. 3)."""

    group_size: int = Field(default=8, description="G: completions sampled per prompt (>= 2).")
    prompts_per_step: int = Field(default=8, ge=1, description="Prompts per GRPO step (batch = prompts x G).")
    max_new_tokens: int = Field(default=8, ge=1, description="Completion length limit.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the rollouts.")
    clip_eps: float = Field(default=0.2, gt=0, lt=1, description="PPO-style ratio clip.")
    beta: float = Field(
        default=0.04, ge=0, description="KL(policy || reference) weight, k3 estimator; 0 = no reference."
    )
    updates_per_batch: int = Field(default=1, ge=1, description="mu: optimizer passes over each batch.")
    minibatch_size: int | None = Field(
        default=None,
        ge=1,
        description="Rows (completions) per optimizer step, at most prompts_per_step x group_size; null: the whole "
        "batch. A multiple of group_size runs each prompt once per group.",
    )
    loss_aggregation: LossAggregation = Field(
        default="sequence_mean",
        description="sequence_mean: mean over each completion's tokens, then over completions (Shao et al. 2024, "
        "eq. 3; TRL's loss_type grpo); token_mean: mean over all tokens of the batch (DAPO; TRL's bnpo).",
    )
    max_grad_norm: float = Field(default=1.0, gt=0)

    @field_validator("group_size")
    @classmethod
    def _group(cls, group_size: int) -> int:
        if group_size < 2:
            raise ValueError(f"must be >= 2 (got {group_size}): GRPO's advantage compares completions within a group")
        return group_size

    @model_validator(mode="after")
    def _minibatch_fits(self) -> GRPOSpec:
        batch = self.prompts_per_step * self.group_size
        if self.minibatch_size is not None and self.minibatch_size > batch:
            raise ConfigError(
                "minibatch_size",
                f"must be <= prompts_per_step x group_size = {batch} (the batch), got {self.minibatch_size}",
            )
        return self


class WarmupSpec(StrictModel):
    """Supervised warm-up on task demonstrations before RL, so a tiny model starts with some reward signal."""

    steps: int = Field(default=300, ge=0, description="Supervised steps (0 = none, e.g. for a pretrained model).")
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    levels: list[int] | None = Field(default=None, description="Levels used for warm-up (default: all).")


class RolesSpec(StrictModel):
    """Where rollout, learner and reference run."""

    mode: Literal["colocated", "actors"] = Field(
        default="actors", description="colocated: all in the trial process (debugging); actors: Ray actors."
    )
    rollout_workers: int = Field(default=1, ge=1, description="Rollout actors (each samples a share of the prompts).")
    reference: Literal["rollout", "actor"] = Field(
        default="rollout", description="Reference model: inside each rollout actor, or its own actor."
    )
    overlap: bool = Field(
        default=True, description="Sample step t+1 while the learner trains on step t (one step off-policy)."
    )
    cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs each rollout/learner/reference actor reserves.")
    gpus_per_rollout: float = Field(default=0.0, ge=0)
    gpus_per_learner: float = Field(default=0.0, ge=0)


class PostTrainSection(StrictModel):
    """GRPO post-training with curricula over verifiable task categories; each curriculum x seed is a trial."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    tasks: Annotated[list[SectionTask], AfterValidator(each_task_once)] | None = Field(
        default=None,
        min_length=1,
        description="Tasks and levels (or reasoning-gym tasks with options): the curriculum's categories "
        "(default: arithmetic levels 1-5, unless a dataset is given).",
    )
    dataset: DatasetSpec | None = Field(
        default=None, description="The researcher's own problems (JSONL) instead of tasks; categories from a column."
    )
    reward_timeout_s: float = Field(
        default=DEFAULT_TIMEOUT_S,
        gt=0,
        le=600,
        description="Time limit per completion of a scorer run in the worker process (a dataset's reward, "
        "reasoning-gym's scorers of tasks without levels); over it, the completion scores 0.",
    )
    reward_memory_mb: int | None = Field(
        default=DEFAULT_MEMORY_MB,
        ge=256,
        description="Address-space cap (MiB) of the worker process running the scorers; a scorer over it scores "
        "0 (MemoryError). null: no cap (a reward that loads a model).",
    )
    curricula: list[str] = Field(
        default_factory=lambda: ["sec", "uniform"],
        min_length=1,
        description=f"Curricula swept: {', '.join(CURRICULUM_NAMES)}.",
    )
    curriculum: CurriculumSpec = Field(default_factory=CurriculumSpec)
    grpo: GRPOSpec = Field(default_factory=GRPOSpec)
    warmup: WarmupSpec = Field(default_factory=WarmupSpec)
    optimizer: OptimizerSpec = Field(
        default_factory=lambda: {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        validate_default=True,
        description="metaopt.optim optimizer spec of the learner.",
    )
    schedule: OptionalScheduleSpec = Field(
        default=None, description="metaopt.optim schedule spec over GRPO steps (default: constant at optimizer.lr)."
    )
    roles: RolesSpec = Field(default_factory=RolesSpec)
    steps: int = Field(default=60, ge=1, description="GRPO steps per trial.")
    steps_per_iteration: int = Field(default=5, ge=1, description="GRPO steps per Tune iteration (and checkpoint).")
    eval_per_category: int = Field(
        default=32,
        ge=1,
        description="Greedy evaluation problems per category (a dataset: its held-out rows, each once, at most this "
        "many).",
    )
    eval_every: int = Field(default=1, ge=1, description="Evaluate every this many iterations (and at the end).")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    scheduler: Literal["grid", "pbt"] = Field(
        default="grid", description="grid: every curriculum x seed; pbt: PBT also adapts the learner's lr."
    )
    pbt_interval: int = Field(default=2, ge=1, description="Iterations between PBT exploit/explore steps.")
    max_failures: int = Field(default=2, ge=0, description="Restarts of a crashed trial from its last checkpoint.")
    samples_to_log: int = Field(default=8, ge=0, description="Sample completions saved as text each iteration.")

    @field_validator("curricula")
    @classmethod
    def _known_curricula(cls, curricula: list[str]) -> list[str]:
        for name in curricula:
            if name not in CURRICULUM_NAMES:
                raise ValueError(f"unknown curriculum {quote(name)}; allowed: {', '.join(CURRICULUM_NAMES)}")
        return curricula

    @property
    def iterations(self) -> int:
        return -(-self.steps // self.steps_per_iteration)

    def problem_source(self) -> dict[str, Any]:
        """What every task set of a trial is built from (driver, learner, rollout workers): plain data."""
        return {
            "tasks": [t.model_dump() for t in self.tasks or ()],
            "dataset": None if self.dataset is None else self.dataset.model_dump(),
            "reward_timeout_s": self.reward_timeout_s,
            "reward_memory_mb": self.reward_memory_mb,
        }

    @model_validator(mode="before")
    @classmethod
    def _tasks_or_dataset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("dataset") is not None and data.get("tasks") is not None:
            raise ConfigError("tasks", "give either tasks or a dataset, not both")
        if data.get("dataset") is None and data.get("tasks") is None:
            return {**data, "tasks": _default_tasks()}
        return data

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> PostTrainSection:
        if self.scheduler == "pbt" and self.pbt_interval >= self.iterations:
            raise ConfigError("pbt_interval", f"must be < the {self.iterations} iterations so PBT perturbs at all")
        base, runs_here = validation_base(info)
        if self.dataset is not None and self.dataset.reward is not None and runs_here:
            check_reward_returns_a_float(self.dataset, self.reward_timeout_s, base, self.reward_memory_mb)
        if self.tasks and runs_here:
            check_no_scorer_evaluates(self.tasks, self.reward_timeout_s, self.reward_memory_mb)
        return self


def check_no_scorer_evaluates(
    tasks: list[SectionTask], timeout_s: float, memory_mb: int | None = DEFAULT_MEMORY_MB
) -> None:
    """Each reasoning-gym task scored in the worker process, probed there on its own correct answer
    (:func:`~metaopt.posttrain.tasks.evaluating_gym_task`): a scorer that evaluates the completion (``eval``, sympy's
    ``parse_expr``) is one ConfigError on ``tasks.<i>.name`` before Ray starts."""
    try:
        found = evaluating_gym_task(tasks, timeout_s, memory_mb)
    except ConfigError as err:  # the worker process did not start
        raise ConfigError("tasks", f"reasoning-gym's scorers did not load: {err.problem}") from None
    if found is not None:
        raise ConfigError(f"tasks.{found[0]}.name", found[1])


def check_reward_returns_a_float(
    dataset: DatasetSpec, timeout_s: float, base: str | Path | None = None, memory_mb: int | None = DEFAULT_MEMORY_MB
) -> None:
    """The user's reward, called once as Ray's workers will call it (in the worker process, with the time limit
    and memory cap, in the user's directory ``base``: the validation's, default
    :func:`metaopt.user_code.user_dir`) on the file's first row, its answer as the completion: a raise, a hang or
    a value that is not a float is one ConfigError on ``dataset.reward`` before Ray starts."""
    from metaopt.posttrain.rewards import ScorerProcess

    answer = read_dataset(dataset).first[1]
    scorer = ScorerProcess(
        {"reward": {"kind": "user", "reference": dataset.reward}},
        timeout_s,
        None if base is None else str(base),
        memory_mb,
    )
    try:
        result = scorer.score("reward", answer, answer)
    except ConfigError as err:
        raise ConfigError("dataset.reward", f"{quote(dataset.reward)}: {err.problem}") from None
    finally:
        scorer.close()
    if result.problem is not None:
        raise ConfigError(
            "dataset.reward", f"{quote(dataset.reward)} {result.problem} (called on the first row's answer)"
        )


def check_model_path(section: PostTrainSection) -> None:
    """A model path that does not exist is one clear error before any trial starts."""
    path = section.model.path
    if path is not None and not Path(path).expanduser().is_dir():
        raise ConfigError(
            "posttrain.model.path",
            f"{quote_path(path)} does not exist or is not a directory "
            "(expected a local Hugging Face checkpoint: config.json, weights, tokenizer files)",
        )


CAPABILITY = Capability(
    kind="posttrain", section=PostTrainSection, runner="metaopt.posttrain.sweep:run", extra="posttrain"
)
