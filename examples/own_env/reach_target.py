"""A researcher's own environment for metaopt's learned objectives: ``env: reach_target:make_env``.

Reach the target: each step the agent sees a target ``t`` in [-1, 1] and answers with a continuous action
``a`` in [-1, 1] (a Box action space, so PPO uses its Gaussian policy); the reward is ``1 - |a - t|``, an
episode lasts ``max_steps_in_episode`` steps (10 by default), so returns lie in [-10, 10] and the best policy
earns 10. It is a gymnax ``Environment`` subclass: gymnax's ``step`` adds the auto-reset and the
``final_observation`` that PPO's time-limit bootstrap reads, and ``reset``/``step`` are jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces


@struct.dataclass
class EnvState(environment.EnvState):
    target: jax.Array


@struct.dataclass
class EnvParams(environment.EnvParams):
    max_steps_in_episode: int = 10


class ReachTarget(environment.Environment):
    """One continuous action per step, rewarded by how close it lands to the observed target."""

    @property
    def default_params(self) -> EnvParams:
        return EnvParams()

    def reset_env(self, key: jax.Array, params: EnvParams):
        state = EnvState(time=0, target=jax.random.uniform(key, (), minval=-1.0, maxval=1.0))
        return self.get_obs(state), state

    def step_env(self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams):
        reward = 1.0 - jnp.abs(jnp.reshape(action, ()) - state.target)
        state = EnvState(time=state.time + 1, target=jax.random.uniform(key, (), minval=-1.0, maxval=1.0))
        return self.get_obs(state), state, reward, jnp.array(False), {}

    def get_obs(self, state: EnvState, params=None, key=None) -> jax.Array:
        return jnp.reshape(state.target, (1,))

    def action_space(self, params: EnvParams | None = None) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, (1,))

    def observation_space(self, params: EnvParams) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, (1,))


def make_env(max_steps_in_episode: int = 10):
    """The factory metaopt calls (with the entry's ``ppo.env_kwargs``): ``(env, env_params)``, as gymnax.make."""
    return ReachTarget(), EnvParams(max_steps_in_episode=max_steps_in_episode)
