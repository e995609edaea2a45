"""The environment a PPO run trains on: a gymnax id or the researcher's own factory, and what the policy needs of it.

An env is named in a :class:`~metaopt.objectives.ppo_settings.PPOConfig` (``env_name``) either by a gymnax id,
built with ``gymnax.make(id, **env_kwargs)``, or by a reference to a factory in the user's code,
``my_envs:make_env`` (:mod:`metaopt.user_code`), called as ``make_env(**env_kwargs) -> (env, env_params)``, the
pair ``gymnax.make`` returns. The env meets gymnax 1.0's interface (``gymnax.environments.environment.Environment``;
subclassing it gives all of this):

* ``env.reset(key, env_params) -> (obs, state)``;
* ``env.step(key, state, action, env_params) -> (obs, state, reward, terminated, truncated, info)``, resetting
  itself when an episode ends, with the pre-reset observation in ``info["final_observation"]`` (needed for the
  time-limit bootstrap, ``ppo.bootstrap_truncation``);
* ``env.action_space(env_params)``: a ``gymnax.environments.spaces.Discrete`` (a categorical policy) or ``Box``
  (a Gaussian policy; actions clipped to its bounds).

Observations of any shape (MinAtar's ``[10, 10, C]`` grids, bsuite's boards) are flattened into the MLP's input.
:func:`check_user_env` builds a user's env once and runs one ``reset`` and one ``step`` with a random action under
``jax.jit``, so a broken factory is one line before Ray and training start.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import user_code
from metaopt.errors import ConfigError
from metaopt.objectives.ppo_settings import PPOConfig

#: What ``env.step`` returns in gymnax 1.0 (the installed interface).
STEP_RETURNS = "(obs, state, reward, terminated, truncated, info)"


class ActionSpec(NamedTuple):
    """What the policy head needs of an action space: categorical over ``size`` actions, or a Gaussian over a
    ``shape``-shaped Box (``size`` = its number of entries) with bounds ``low`` / ``high`` (flat, float32)."""

    discrete: bool
    size: int
    shape: tuple[int, ...] = ()
    low: np.ndarray | None = None
    high: np.ndarray | None = None


def make_env(config: PPOConfig) -> tuple[Any, Any]:
    """``(env, env_params)`` of a config: ``gymnax.make`` for an id, the user's factory for a reference; the
    config's ``env_params`` replace fields of the env's parameters."""
    if user_code.is_reference(config.env_name):
        env, env_params = _from_factory(config.env_name, config.env_kwargs)
    else:
        import gymnax

        env, env_params = gymnax.make(config.env_name, **dict(config.env_kwargs))
    if config.env_params:
        env_params = env_params.replace(**dict(config.env_params))
    return env, env_params


def code_fingerprint(env_name: str) -> str:
    """What a compiled PPO program of ``env_name`` depends on beyond its name, for the caches of compiled programs
    (:func:`metaopt.objectives.ppo.train_many`, :class:`~metaopt.objectives.population.PopulationEvaluator`): for a
    user env, its module's file, size and modification time (:func:`metaopt.user_code.fingerprint`), so a module
    edited since (a notebook) or another folder's module of the same name compiles afresh; "" for a gymnax id."""
    return user_code.fingerprint(env_name) if user_code.is_reference(env_name) else ""


def observation_size(env: Any, env_params: Any) -> int:
    """Entries of one observation, flattened (the policy's input width), from the shape ``reset`` returns."""
    obs, _ = jax.eval_shape(env.reset, jax.random.PRNGKey(0), env_params)
    return math.prod(obs.shape)


def action_spec(env: Any, env_params: Any, name: str) -> ActionSpec:
    """The policy's kind from the env's action space: Discrete -> categorical, Box -> Gaussian."""
    space = env.action_space(env_params)
    if hasattr(space, "n"):
        return ActionSpec(discrete=True, size=int(space.n))
    if all(hasattr(space, a) for a in ("shape", "low", "high")):
        shape = tuple(int(d) for d in space.shape)
        low, high = (np.broadcast_to(np.asarray(b, np.float32), shape).reshape(-1) for b in (space.low, space.high))
        return ActionSpec(discrete=False, size=math.prod(shape), shape=shape, low=low, high=high)
    raise ConfigError(
        "", f"{name}'s action space is a {type(space).__name__}; the PPO trains on gymnax Discrete or Box actions"
    )


def check_user_env(config: PPOConfig, base: str | None = None) -> None:
    """Build a user env (``config.env_name`` a reference) and run one ``reset`` and one ``step`` with a random
    action under ``jax.jit``. Anything wrong is one :class:`ConfigError` line (field ``""``: the env entry;
    ``env_params``: a name that is not a field of the env's parameters)."""
    reference = config.env_name
    user_code.load_callable(reference, (), base=base)
    env, env_params = _from_factory(reference, config.env_kwargs, base=base)
    if config.env_params:
        known = _param_names(env_params)
        for key, _ in config.env_params:
            if key not in known:
                allowed = ", ".join(sorted(known)) or "none (env_params is not a dataclass)"
                raise ConfigError(
                    "env_params", f"{key!r} is not a field of {reference}'s env_params; allowed: {allowed}"
                )
        env_params = env_params.replace(**dict(config.env_params))
    spec = _attempt(reference, "env.action_space(env_params)", action_spec, env, env_params, reference)
    reset = _attempt(reference, "env.reset under jax.jit", jax.jit(env.reset), jax.random.PRNGKey(0), env_params)
    if not isinstance(reset, tuple | list) or len(reset) != 2:
        raise ConfigError("", f"{reference!r}: env.reset returned {_count(reset)}; expected (obs, state)")
    obs, state = reset
    action = _random_action(spec, jax.random.PRNGKey(1))
    step = _attempt(
        reference,
        "env.step under jax.jit (a random action)",
        jax.jit(env.step),
        jax.random.PRNGKey(2),
        state,
        action,
        env_params,
    )
    _check_step(reference, step, jnp.shape(obs), config.bootstrap_truncation)


def _attempt(reference: str, what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``; an exception from the user's env is one ConfigError line saying which call raised it."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as err:
        lines = str(err).strip().splitlines()
        detail = f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
        raise ConfigError("", f"{reference!r}: {what} raised {detail}") from None


def _count(value: Any) -> str:
    return f"{len(value)} values" if isinstance(value, tuple | list) else f"a {type(value).__name__}"


def _from_factory(reference: str, env_kwargs: tuple, base: str | None = None) -> tuple[Any, Any]:
    factory = user_code.load(reference, base=base)
    pair = user_code.call(functools.partial(factory, **dict(env_kwargs)), reference)
    what = "a pair (env, env_params), as gymnax.make returns"
    user_code.expect(pair, reference, isinstance(pair, tuple | list) and len(pair) == 2, what)
    env, env_params = pair
    missing = [m for m in ("reset", "step", "action_space") if not callable(getattr(env, m, None))]
    if missing:
        raise ConfigError(
            "",
            f"{reference!r} returned an env without {', '.join(missing)}; expected gymnax's Environment interface "
            "(subclass gymnax.environments.environment.Environment)",
        )
    return env, env_params


def _param_names(env_params: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(env_params)} if dataclasses.is_dataclass(env_params) else set()


def _random_action(spec: ActionSpec, key: jax.Array) -> jax.Array:
    if spec.discrete:
        return jax.random.randint(key, (), 0, spec.size)
    return jax.random.uniform(
        key, spec.shape, minval=spec.low.reshape(spec.shape), maxval=spec.high.reshape(spec.shape)
    )


def _check_step(reference: str, out: Any, obs_shape: tuple[int, ...], needs_final_observation: bool) -> None:
    """One step's return value: gymnax 1.0's six values, a scalar reward, observations of the reset's shape."""
    if not isinstance(out, tuple | list) or len(out) != 6:
        raise ConfigError(
            "", f"{reference!r}: env.step returned {_count(out)}; gymnax 1.0's step returns {STEP_RETURNS}"
        )
    obs, _, reward, terminated, truncated, info = out
    for name, value in (("reward", reward), ("terminated", terminated), ("truncated", truncated)):
        if jnp.shape(value) != ():
            raise ConfigError("", f"{reference!r}: env.step's {name} has shape {jnp.shape(value)}; expected a scalar")
    if jnp.shape(obs) != obs_shape:
        raise ConfigError(
            "",
            f"{reference!r}: env.step's observation has shape {jnp.shape(obs)}, reset's {obs_shape}; they must agree",
        )
    if needs_final_observation and not (isinstance(info, dict) and "final_observation" in info):
        raise ConfigError(
            "",
            f"{reference!r}: env.step's info has no 'final_observation' (the pre-reset observation gymnax's "
            "Environment.step adds); subclass gymnax's Environment or set ppo.bootstrap_truncation: false",
        )
