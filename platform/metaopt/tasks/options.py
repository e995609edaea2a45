"""The options of every task (``task_options:`` in an experiment file), one pydantic model per task.

Kept apart from the tasks themselves so that validating an experiment file imports pydantic only, never
torch or RLlib; each task validates the options it is given with the same model
(:func:`metaopt.tasks.parse_task_options`).

Numbers are strict, as in optimizer specs (:mod:`metaopt.optim.specs`): YAML gives them typed, so
``batch_size: "8"`` or ``minibatch_size: 128.0`` is a mistake to report, not a value to convert.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from metaopt.config import SEED_LIMIT, StrictModel, quote
from metaopt.errors import ConfigError
from metaopt.extras import runs_here
from metaopt.optim.specs import Integer, Number

#: Where a task trains: ``auto`` = the GPU Ray gave this process (gpus_per_trial > 0), else CPU.
Device = Literal["auto", "cpu", "cuda"]
#: A seed (:data:`metaopt.config.Seed`'s range), given as an integer.
TaskSeed = Annotated[Integer, Field(ge=0, lt=SEED_LIMIT)]


def layer_widths(value: Any) -> tuple[int, ...]:
    """Hidden layer widths as a non-empty tuple of positive ints; a single int means one layer."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    if not ok or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in value):
        raise ValueError("must be a non-empty list of positive layer widths")
    return tuple(value)


class TaskOptionsModel(StrictModel):
    """Options of one task: fixed once validated, and hashable (tasks cache data built from them)."""

    model_config = ConfigDict(frozen=True)


class DigitsOptions(TaskOptionsModel):
    """An MLP classifier on scikit-learn's 8x8 digits (:class:`metaopt.tasks.digits.DigitsTask`)."""

    hidden: tuple[int, ...] = Field(default=(64,), description="Hidden layer widths.")
    batch_size: Integer = Field(default=32, ge=1, description="Training minibatch size.")
    split_seed: TaskSeed = Field(default=0, description="Seed of the fixed train/validation/test split.")
    val_fraction: Number = Field(default=0.2, gt=0, lt=0.5, description="Share of the images for validation.")
    test_fraction: Number = Field(default=0.2, gt=0, lt=0.5, description="Share of the images for the test split.")
    device: Device = "auto"

    _widths = field_validator("hidden", mode="before")(layer_widths)


class TinyLMOptions(TaskOptionsModel):
    """A tiny causal transformer on synthetic second-order Markov text (:class:`metaopt.tasks.tiny_lm.TinyLMTask`)."""

    vocab: Integer = Field(default=16, ge=1, description="Vocabulary size.")
    branching: Integer = Field(default=3, ge=1, description="Next tokens each pair of previous tokens allows.")
    seq_len: Integer = Field(default=32, ge=1)
    d_model: Integer = Field(default=32, ge=1)
    heads: Integer = Field(default=2, ge=1)
    layers: Integer = Field(default=1, ge=1)
    batch_size: Integer = Field(default=16, ge=1)
    train_sequences: Integer = Field(default=512, ge=1)
    val_sequences: Integer = Field(default=128, ge=1)
    data_seed: TaskSeed = Field(default=0, description="Seed of the Markov source and its samples.")
    device: Device = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> TinyLMOptions:
        if self.branching > self.vocab:
            raise ConfigError("branching", f"must be <= vocab ({self.branching} > {self.vocab})")
        if self.d_model % self.heads:
            raise ConfigError("heads", f"must divide d_model ({self.d_model} % {self.heads} != 0)")
        return self


# Classic-control ids shown when an env id is unknown and nothing looks similar.
_EXAMPLE_ENVS = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "LunarLander-v3")


class PPOOptions(TaskOptionsModel):
    """RLlib PPO on a gymnasium environment (:class:`metaopt.tasks.rllib_ppo.RLlibPPOTask`)."""

    env: str = Field(default="CartPole-v1", description="gymnasium env id.")
    num_env_runners: Integer = Field(default=0, ge=0, description="Remote EnvRunner actors (0: sample in the trial).")
    train_batch_size: Integer = Field(default=1000, ge=1, description="Env steps sampled per training iteration.")
    minibatch_size: Integer = Field(default=128, ge=1)
    num_epochs: Integer = Field(default=6, ge=1, description="SGD passes over each batch.")
    fcnet_hiddens: tuple[int, ...] = Field(default=(64, 64), description="Hidden layer widths.")
    gamma: Number = Field(default=0.99, gt=0, le=1, description="Discount factor.")

    _widths = field_validator("fcnet_hiddens", mode="before")(layer_widths)

    @field_validator("env")
    @classmethod
    def _buildable_env(cls, value: str, info: ValidationInfo) -> str:
        """A gymnasium env id that is registered and can be built here (its dependencies installed); not checked
        for an experiment that runs elsewhere (metaopt submit / list): the cluster's gymnasium and env packages
        decide there, and this machine may have neither."""
        if not runs_here(info.context):
            return value
        import gymnasium

        if value not in gymnasium.envs.registry:
            close = difflib.get_close_matches(value, list(gymnasium.envs.registry), n=3, cutoff=0.6)
            examples = close or [env for env in _EXAMPLE_ENVS if env in gymnasium.envs.registry]
            raise ConfigError("", f"unknown gymnasium env id {quote(value)}; valid ids include {', '.join(examples)}")
        try:
            # Building once here turns a missing extra (box2d, mujoco) into a one-line error
            # now instead of a stack trace from inside RLlib's EnvRunner later.
            gymnasium.make(value).close()
        except gymnasium.error.Error as err:
            raise ConfigError("", f"gymnasium cannot build {quote(value)}: {err}") from None
        return value

    @model_validator(mode="after")
    def _minibatch_fits(self) -> PPOOptions:
        if self.minibatch_size > self.train_batch_size:
            raise ConfigError(
                "minibatch_size", f"must be <= train_batch_size ({self.train_batch_size}), got {self.minibatch_size}"
            )
        return self


class RLlibOptimizerSpec(StrictModel):
    """The optimizer of RLlib PPO: RLlib builds it inside its Learner (``torch.optim.Adam``); only its learning
    rate is ours. ``adamw`` is accepted as a name so one spec can be shared with other tasks, but it trains with
    that same Adam (no decoupled weight decay). A missing ``name`` means ``adam``."""

    name: Literal["adam", "adamw"] = "adam"

    @model_validator(mode="before")
    @classmethod
    def _only_the_name(cls, spec: Any) -> Any:
        why = "RLlib PPO trains with RLlib's own torch Adam, of which only the learning rate is controlled"
        if not isinstance(spec, dict):
            return spec  # pydantic reports the type
        for key in spec:
            if key != "name":
                raise ConfigError(str(key), f"not supported: {why}; only 'name' may be set")
        if spec.get("name", "adam") not in ("adam", "adamw"):
            raise ConfigError("name", f"must be adam or adamw ({why}), got {quote(spec['name'])}")
        return spec
