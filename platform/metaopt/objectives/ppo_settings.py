"""PPO settings: which envs the JAX PPO trains on, each env family's defaults, and the validated :class:`PPOConfig`.

An env is any gymnax environment id (the list is gymnax's own, ``gymnax.registered_envs``) or a reference to the
researcher's factory, ``my_envs:make_env`` (:mod:`metaopt.user_code`; built and checked by
:mod:`metaopt.objectives.envs`). Ids in :data:`TUNED_ENVS` get settings tuned for them; every other env gets
the generic defaults, :class:`PPOSettings`' own (a starting point, not a tuned setting).

Nothing here imports JAX (gymnax is imported only to look up an id outside :data:`TUNED_ENVS`, and only where
the experiment runs: ``metaopt submit``/``list``, validation context ``check_paths`` false, check an id's form
only, so this machine needs neither gymnax nor JAX): the ``lpo:`` /
``lpo_eval:`` sections (:mod:`metaopt.objectives.config`) validate each env's PPO overrides with these models when
a file loads, and :mod:`metaopt.objectives.ppo` builds its training
loop from a :class:`PPOConfig`. Both import this module, neither imports the other.

:class:`PPOSettings` holds the hyperparameters (one field each: bounds, default, description); it is also the
typed model of an experiment file's per-env ``ppo:`` overrides, of which only the keys written are kept
(:data:`PPOOverrides`): the rest come from the env family's defaults (:func:`ppo_config_for`).
:class:`PPOConfig` adds the env and the step budget and checks what spans fields (the minibatch split, one
update's worth of steps, ``env_params`` names). It is frozen and hashable: :func:`metaopt.objectives.ppo.train_many`
caches its compiled program per config.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from metaopt import user_code
from metaopt.config import StrictModel, first_error, quote
from metaopt.errors import ConfigError
from metaopt.extras import DISTRIBUTION, runs_here
from metaopt.optim.specs import Number

__all__ = [
    "GYMNAX_ENV_LIST",
    "MINATAR_DEFAULT_LR",
    "PPO_REFERENCE_LR",
    "TUNED_ENVS",
    "EnvName",
    "PPOConfig",
    "PPOOverrides",
    "PPOSettings",
    "env_label",
    "ppo_config_for",
    "validate_overrides",
]

#: gymnax environments whose PPO defaults were tuned (:func:`ppo_config_for`); any other gymnax id trains with
#: the generic defaults.
TUNED_ENVS = (
    "CartPole-v1",
    "Acrobot-v1",
    "MountainCar-v0",
    "Pendulum-v1",
    "Asterix-MinAtar",
    "Breakout-MinAtar",
    "Freeway-MinAtar",
    "SpaceInvaders-MinAtar",
    "Seaquest-MinAtar",
)

#: Where the full list of env ids lives (named in the error for an unknown one).
GYMNAX_ENV_LIST = "gymnax.registered_envs"

#: PPO learning rates for MinAtar used by Lu et al. 2022 / Jackson et al. 2024 (tuned for PPO).
PPO_REFERENCE_LR = {
    "Asterix-MinAtar": 3e-3,
    "Breakout-MinAtar": 1e-2,
    "Freeway-MinAtar": 1e-3,
    "SpaceInvaders-MinAtar": 7e-3,
}

#: Learning rate for MinAtar games without a reference value (not tuned).
MINATAR_DEFAULT_LR = 3e-3


#: The form of a gymnax id (``CartPole-v1``, ``Breakout-MinAtar``): what is checked where the run happens elsewhere.
_ENV_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


#: The validation context of the section building a :class:`PPOConfig` (:meth:`PPOConfig.validated`): pydantic
#: hands a model with its own ``__init__`` no context, so it travels here.
_SECTION_CONTEXT: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("ppo_section_context")


def _context(info: ValidationInfo) -> Mapping[str, Any] | None:
    return info.context if info.context is not None else _SECTION_CONTEXT.get(None)


def _known_env(env: str, info: ValidationInfo) -> str:
    """A gymnax id or a ``module:function`` reference (its syntax only: importing it is the section's check).
    An id outside :data:`TUNED_ENVS` is looked up in gymnax's registry where the experiment runs here
    (:func:`metaopt.extras.runs_here`); elsewhere only its form is checked."""
    if user_code.is_reference(env):
        return env
    if ":" in env:
        raise ConfigError("", user_code.reference_problem(env))
    if env in TUNED_ENVS:  # no gymnax (hence JAX) import for the envs most files name
        return env
    if not runs_here(_context(info)):
        if not _ENV_ID.match(env):
            raise ConfigError("", f"{quote(env)} is not a gymnax env id (like CartPole-v1) or 'module:function'")
        return env
    registered = _gymnax_ids()
    if env not in registered:
        close = difflib.get_close_matches(env, registered, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            "",
            f"unknown env {quote(env)}; {hint}every gymnax id is in {GYMNAX_ENV_LIST} ({len(registered)} envs), "
            "or name your own factory as 'module:function'",
        )
    return env


def _gymnax_ids() -> list[str]:
    """``gymnax.registered_envs``; a gymnax (or JAX) that does not import is one ConfigError line."""
    try:
        import gymnax
    except ImportError as err:
        raise ConfigError(
            "",
            f"looking up a gymnax env id needs gymnax and JAX, which did not import ({type(err).__name__}: {err}); "
            f"pip install '{DISTRIBUTION}'",
        ) from None
    return list(gymnax.registered_envs)


#: A gymnax env id (any of ``gymnax.registered_envs``) or a ``module:function`` reference to the user's env factory
#: (what a section's ``env`` and PPOConfig's ``env_name`` accept).
EnvName = Annotated[str, AfterValidator(_known_env)]


def env_label(env: str) -> str:
    """An env's name in metric keys and tables: the gymnax id; a user factory as ``module.function``; a Python
    object (``pickle:``, from the Python API) as ``python-object-<its hash>``."""
    if not user_code.is_reference(env):
        return env
    if env.startswith(user_code.PICKLE_PREFIX):
        return f"{user_code.name_of(env)}-{env.rsplit('/', 1)[-1].split('.')[0][:8]}"
    return env.replace(":", ".")


def _freeze_pairs(value: Any) -> Any:
    """A mapping (or pairs) of name -> value as a sorted tuple of pairs, so the config stays hashable."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        try:
            items = [tuple(item) for item in value]
        except TypeError:
            raise ValueError("expected a mapping of name -> value") from None
    if any(len(item) != 2 or not isinstance(item[0], str) for item in items):
        raise ValueError("expected a mapping of name -> value")
    return tuple(sorted(items))


#: ``name -> value`` options held as sorted pairs (hashable); written and dumped as a mapping.
EnvOptions = Annotated[
    tuple[tuple[str, Any], ...],
    BeforeValidator(_freeze_pairs),
    PlainSerializer(lambda pairs: dict(pairs), return_type=dict),
]


class PPOSettings(StrictModel):
    """PPO hyperparameters (defaults: PureJaxRL-style CartPole settings, Lu et al. 2022's PureJaxRL).

    ``clip_eps`` is used only by the value-function clipping; the actor's trust region is the drift's job.
    """

    model_config = ConfigDict(frozen=True)

    num_envs: StrictInt = Field(default=8, ge=1, description="Environments stepped in parallel.")
    num_steps: StrictInt = Field(default=128, ge=1, description="Steps per env per rollout (batch: num_envs x this).")
    update_epochs: StrictInt = Field(default=4, ge=1, description="Passes over each batch.")
    num_minibatches: StrictInt = Field(default=4, ge=1, description="Minibatches per pass; must divide the batch.")
    gamma: Number = Field(default=0.99, ge=0, le=1, description="Discount.")
    gae_lambda: Number = Field(default=0.95, ge=0, le=1, description="GAE lambda (Schulman et al. 2016, eq. 16).")
    clip_eps: Number = Field(
        default=0.2,
        gt=0,
        description="Value-clipping range; also the PPO clip of the built-in ppo drift and of the learned drifts' "
        "inner PPO term in lpo and lpo_eval (the actor's clip is the drift's).",
    )
    clip_value: StrictBool = Field(default=True, description="PPO2's clipped value loss.")
    ent_coef: Number = Field(default=0.01, ge=0, description="Entropy bonus weight.")
    vf_coef: Number = Field(default=0.5, ge=0, description="Value loss weight.")
    max_grad_norm: Number = Field(default=0.5, gt=0, description="Global-norm gradient clip.")
    lr: Number = Field(default=2.5e-4, gt=0, description="Adam learning rate (eps 1e-5).")
    anneal_lr: StrictBool = Field(default=True, description="Decay the lr linearly to 0 over the run.")
    hidden: StrictInt = Field(default=64, ge=1, description="Units per hidden layer of actor and critic.")
    layers: StrictInt = Field(default=2, ge=1, description="Hidden layers of actor and critic.")
    activation: Literal["tanh", "relu"] = Field(default="tanh", description="Hidden-layer activation.")
    normalize_advantages: StrictBool = Field(default=True, description="Normalise advantages per minibatch.")
    bootstrap_truncation: StrictBool = Field(default=True, description="Bootstrap time-limit truncations with V.")
    env_kwargs: EnvOptions = Field(
        default=(), description="Keyword arguments of gymnax.make(env_name, ...), or of the user's env factory."
    )
    env_params: EnvOptions = Field(default=(), description="Fields of the env's EnvParams to replace.")


def validate_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The PPO settings written for one env, each checked by :class:`PPOSettings`; only the keys written are kept
    (coerced), the others come from the env family's defaults. A bad one is a ConfigError naming its key."""
    try:
        settings = PPOSettings.model_validate(overrides)
    except ValidationError as err:
        raise first_error("", PPOSettings, err) from None
    return settings.model_dump(include=settings.model_fields_set)


#: An experiment file's per-env ``ppo:`` mapping: :class:`PPOSettings` fields, validated by that model, kept as
#: the plain mapping written (it travels through Tune configs and JSON).
PPOOverrides = Annotated[dict[str, Any], AfterValidator(validate_overrides)]


class PPOConfig(PPOSettings):
    """One PPO run's settings: the env, its step budget and the hyperparameters of :class:`PPOSettings`.

    ``env_name`` is a gymnax id or a ``module:function`` reference to the user's env factory (:data:`EnvName`).
    ``env_kwargs`` go to ``gymnax.make(env_name, **env_kwargs)`` (or to the factory); ``env_params`` replace fields
    of the env's default ``EnvParams`` (e.g. ``{"max_steps_in_episode": 200}``); both are stored as sorted tuples
    of pairs so the config stays hashable. Bad values raise :class:`~metaopt.errors.ConfigError` (a
    ``ValueError``) with one line naming the field, also when built directly (``PPOConfig(num_envs=0)``).
    """

    env_name: EnvName = Field(
        default="CartPole-v1", description="gymnax environment id, or 'module:function' naming an env factory."
    )
    total_timesteps: StrictInt = Field(default=100_000, ge=1, description="Environment steps of the run (the horizon).")

    def __init__(self, **settings: Any) -> None:
        try:
            super().__init__(**settings)
        except ValidationError as err:  # one line naming the field, like every other bad input
            raise first_error("", type(self), err) from None

    @classmethod
    def validated(cls, context: Mapping[str, Any] | None = None, **settings: Any) -> PPOConfig:
        """``PPOConfig(**settings)`` validated with pydantic's validation ``context`` (an experiment section's:
        ``check_paths`` false looks no env up in gymnax, :func:`_known_env`)."""
        token = _SECTION_CONTEXT.set(context)
        try:
            return cls(**settings)
        finally:
            _SECTION_CONTEXT.reset(token)

    @property
    def batch_size(self) -> int:
        """Transitions per PPO update: ``num_envs * num_steps``."""
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        """``total_timesteps // (num_envs * num_steps)``: the horizon ``N`` of the run."""
        return self.total_timesteps // self.batch_size

    @model_validator(mode="after")
    def _fits_the_batch(self, info: ValidationInfo) -> PPOConfig:
        if self.batch_size % self.num_minibatches:
            raise ConfigError(
                "num_minibatches", f"must divide num_envs * num_steps = {self.batch_size}, got {self.num_minibatches}"
            )
        if self.num_updates < 1:
            raise ConfigError(
                "total_timesteps",
                f"must be >= num_envs * num_steps = {self.batch_size} (one update), got {self.total_timesteps}",
            )
        # a user env's env_params are checked where it is built; a gymnax env's need gymnax: only where it runs
        if self.env_params and not user_code.is_reference(self.env_name) and runs_here(_context(info)):
            known = env_param_names(self.env_name, self.env_kwargs)
            for key, _ in self.env_params:
                if key not in known:
                    raise ConfigError(
                        "env_params",
                        f"{quote(key)} is not a field of {self.env_name}'s EnvParams; "
                        f"allowed: {', '.join(sorted(known))}",
                    )
        return self


def env_param_names(env_name: str, env_kwargs: tuple[tuple[str, Any], ...] = ()) -> set[str]:
    """The fields of an env's ``EnvParams`` (imports gymnax, hence JAX: asked only when ``env_params`` are set)."""
    import gymnax

    _, defaults = gymnax.make(env_name, **dict(env_kwargs))
    return {f.name for f in dataclasses.fields(defaults)}


#: Settings that differ from :class:`PPOSettings`'s defaults, per env family.
_MINATAR_DEFAULTS: dict[str, Any] = {
    "num_envs": 64,
    "num_minibatches": 8,
    "total_timesteps": 10_000_000,
    "activation": "relu",
}
_CLASSIC_DEFAULTS: dict[str, Any] = {"lr": 2.5e-3}
_PENDULUM_DEFAULTS: dict[str, Any] = {
    "num_envs": 16,
    "num_steps": 100,
    "update_epochs": 10,
    "num_minibatches": 8,
    "lr": 1e-2,
    "ent_coef": 0.0,
    "clip_value": False,
    "gamma": 0.95,
}


def ppo_config_for(env_name: str, *, context: Mapping[str, Any] | None = None, **overrides: Any) -> PPOConfig:
    """Default PPO settings for ``env_name``, with ``overrides`` (:class:`PPOConfig` fields) applied; ``context``:
    the validation context of the experiment section asking (:meth:`PPOConfig.validated`).

    The tuned envs (:data:`TUNED_ENVS`):

    MinAtar (Lu et al. 2022; Jackson et al. 2024, appendix): 64 envs x 128 steps, 4 epochs,
    8 minibatches, relu 64x2, annealed lr from :data:`PPO_REFERENCE_LR` (3e-3 where the game
    has no reference value), 1e7 steps.
    Classic control (CartPole-v1, Acrobot-v1, MountainCar-v0): 8 envs x 128 steps, 4 epochs,
    4 minibatches, tanh 64x2, annealed lr 2.5e-3, 1e5 steps. On CartPole this PPO (clip drift)
    reached final returns of 177-500 (mean ~410) over 8 seeds with it, against 233-313
    (mean ~280) with :class:`PPOConfig`'s PureJaxRL default lr 2.5e-4.
    Pendulum-v1 (a Box action: the Gaussian policy): 16 envs x 100 steps, 10 epochs, 8 minibatches,
    tanh 64x2, annealed lr 1e-2, gamma 0.95, no entropy bonus, unclipped value loss, 1e5 steps. The
    returns of the first episodes (about -1250) rose to -350 and -180 at 1e5 steps (2 seeds; -350 and
    -375 at 3.2e4), against about -1130 with the generic defaults. PPO2's value clipping at 0.2 holds
    the critic back on Pendulum's returns in the hundreds, hence unclipped.

    Every other env (another gymnax id, a user factory) gets the generic defaults, :class:`PPOSettings`' own:
    PureJaxRL's CartPole settings (8 envs x 128 steps, 4 epochs x 4 minibatches, tanh 64x2, lr 2.5e-4
    annealed, entropy 0.01, 1e5 steps). They are a starting point, not tuned for that env: set ``ppo:``.
    Unknown override names and bad values raise :class:`~metaopt.errors.ConfigError` naming the field.
    """
    if env_name in TUNED_ENVS and env_name.endswith("-MinAtar"):
        defaults = {**_MINATAR_DEFAULTS, "lr": PPO_REFERENCE_LR.get(env_name, MINATAR_DEFAULT_LR)}
    elif env_name == "Pendulum-v1":
        defaults = _PENDULUM_DEFAULTS
    elif env_name in TUNED_ENVS:  # classic control
        defaults = _CLASSIC_DEFAULTS
    else:  # the generic defaults (PPOSettings'), or a name PPOConfig rejects
        defaults = {}
    return PPOConfig.validated(context, **{**defaults, **overrides, "env_name": env_name})
