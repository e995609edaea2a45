"""A pure, jit-able, vmap-able JAX PPO whose actor loss takes any mirror-learning *drift*.

Mirror learning (Kuba et al. 2022, "Mirror Learning: A Unifying Framework of Policy
Optimisation") writes the policy-improvement objective as

    L(theta) = E[ r_theta * A ] - E[ D(r_theta, A) ],      r_theta = pi_theta(a|s) / pi_old(a|s),

with a *drift* ``D >= 0`` and ``D = 0`` at ``r = 1``. PPO's clipped surrogate
(Schulman et al. 2017, eq. 7) is the drift

    D_PPO(r, A) = relu((r - clip(r, 1 - eps, 1 + eps)) * A),

because ``min(r A, clip(r) A) = r A - relu((r - clip(r)) A)``. Learned Policy Optimisation
(Lu et al. 2022, "Discovered Policy Optimisation", eq. 4) meta-learns ``D`` as a network of
``(r, A)``; Temporally-Aware LPO (Jackson et al. ICLR 2024, "Discovering Temporally-Aware
Reinforcement Learning Algorithms", eq. 10) adds the training progress ``n / N`` as an input
(``n``: env steps taken before the update's rollout, ``N``: the run's ``total_timesteps``), optionally
also the horizon ``log N``. This module minimises (per minibatch)

    actor_loss = -mean(r * A - drift_fn(drift_params, r, A, progress))

plus the usual value and entropy terms, so any drift with the contract

    drift_fn(drift_params, ratio, advantage, progress) -> penalty   # shape of ratio, >= 0

plugs in; ``progress`` is a :class:`Progress`. ``drift_params`` is an arbitrary pytree
(``None`` is fine) and is a vmap axis of :func:`make_train`'s ``train``.

Implementation notes (written for this project; the structure follows the usual
single-file JAX PPO layout of Lu et al. 2022's PureJaxRL):

* Networks: separate actor and critic MLPs (no shared trunk, as in the LPO/TA-LPO MinAtar
  and classic-control setups). Observations are flattened, so MinAtar's ``[10, 10, C]`` grids
  feed the MLP as ``100 * C`` vectors. The env's action space picks the policy
  (:mod:`metaopt.objectives.envs`): Discrete -> categorical over the actor's logits; Box -> a
  diagonal Gaussian whose mean is the actor's output and whose log-std is a state-independent
  parameter (initially 0), as in PPO's continuous-control experiments (Schulman et al. 2017,
  sec. 6.1) and PureJaxRL's ``ppo_continuous_action.py``. The env gets the action clipped to
  the Box's bounds; the log-probability is the unclipped sample's, summed over action
  dimensions, so the ratio the drift sees is the joint ``pi(a|s) / pi_old(a|s)`` and every
  drift works unchanged.
* Initialisation is variance-scaling normal (He for relu, LeCun for tanh; actor head scaled
  by ``0.01``, critic head by ``1``), *not* orthogonal: with JAX 0.10 on a 2-thread CPU a
  ``vmap`` over the QR-based orthogonal initializer can deadlock.
* GAE (Schulman et al. 2016, eq. 16). Time-limit truncation is bootstrapped: on a step
  that is truncated but not terminated, the reward used for GAE gets
  ``+ gamma * V(final_observation)`` (gymnax 1.0 returns the pre-reset observation in
  ``info["final_observation"]``), and the trace is cut at every ``terminated | truncated``.
* Adam (eps 1e-5) after global-norm clipping; the learning rate decays linearly to 0 over
  the run's optimiser steps when ``anneal_lr``.
* Advantages are normalised per minibatch (the drift sees the normalised advantage);
  the value loss is PPO2's clipped value loss with ``clip_eps`` (``clip_value=True``).

Settings are a :class:`~metaopt.objectives.ppo_settings.PPOConfig` (validated, frozen, hashable; no JAX in that
module, so experiment files are checked with it without importing this one).

Episode logging: a per-env running return is kept in the scan carry; an episode's return
is recorded on the step it ends (``terminated | truncated``). ``episode_returns[n]`` is the
mean return of the episodes completed during update ``n``; where none completed, it
*carries the previous update's value* (0 before the first completion), so it is NaN-free.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.errors import ConfigError
from metaopt.objectives.drifts import Progress, make_drift
from metaopt.objectives.envs import ActionSpec, action_spec, code_fingerprint, make_env, observation_size
from metaopt.objectives.ppo_settings import (
    MINATAR_DEFAULT_LR,
    PPO_REFERENCE_LR,
    TUNED_ENVS,
    PPOConfig,
    ppo_config_for,
)

__all__ = [
    "MINATAR_DEFAULT_LR",
    "PPO_REFERENCE_LR",
    "TUNED_ENVS",
    "PPOConfig",
    "Progress",
    "env_dims",
    "gaussian_log_prob",
    "init_network",
    "make_train",
    "ppo_clip_drift",
    "ppo_config_for",
    "progress_at",
    "train_many",
]

DriftFn = Callable[[Any, jax.Array, jax.Array, Progress], jax.Array]


def ppo_clip_drift(clip_eps: float = 0.2) -> Callable:
    """PPO's clip as a drift, ``relu((r - clip(r, 1-eps, 1+eps)) * A)`` (Lu et al. 2022, eq. 3): the one in
    :mod:`metaopt.objectives.drifts`. Equal ``clip_eps`` give the same (hashable) function, so the
    :func:`train_many` compile cache keys on it."""
    return make_drift("ppo", clip_eps=float(clip_eps))[0]


# --------------------------------------------------------------------------- networks


def init_network(key: jax.Array, obs_dim: int, num_actions: int, config: PPOConfig, *, gaussian: bool = False) -> dict:
    """Actor and critic MLP parameters: ``{"actor": [...], "critic": [...]}`` of ``{"w", "b"}`` layers, and for a
    Gaussian policy (``gaussian``: ``num_actions`` is then the action's dimension) ``"log_std"``, zeros.

    Weights are variance-scaling normal, ``w ~ N(0, scale / fan_in)`` (He et al. 2015 for relu:
    scale 2; LeCun for tanh: scale 1); heads use scale ``0.01**2`` for the policy logits or mean (a
    near-uniform, or near-zero-mean, initial policy: the usual PPO choice) and ``1`` for the value; biases are 0.
    No orthogonal init (see module docstring). All weights come from *one* ``random.normal``
    draw that is sliced up, which keeps XLA compile time down (one RNG kernel, not one per layer).
    """
    hidden_scale = 2.0 if config.activation == "relu" else 1.0
    trunk = [obs_dim] + [config.hidden] * config.layers
    shapes = {"actor": [*trunk, num_actions], "critic": [*trunk, 1]}
    head_scale = {"actor": 1e-4, "critic": 1.0}
    total = sum(a * b for sizes in shapes.values() for a, b in itertools.pairwise(sizes))
    noise = jax.random.normal(key, (total,), jnp.float32)
    params, offset = {}, 0
    for name, sizes in shapes.items():
        layers = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            scale = head_scale[name] if i == len(sizes) - 2 else hidden_scale
            w = noise[offset : offset + fan_in * fan_out].reshape(fan_in, fan_out) * math.sqrt(scale / fan_in)
            offset += fan_in * fan_out
            layers.append({"w": w, "b": jnp.zeros((fan_out,), jnp.float32)})
        params[name] = layers
    if gaussian:
        params["log_std"] = jnp.zeros((num_actions,), jnp.float32)
    return params


_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """``log N(action; mean, exp(log_std)^2)`` summed over the last axis: the joint log-probability of a
    diagonal Gaussian's action vector, so ratios of it are the joint ``pi(a|s) / pi_old(a|s)``."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * jnp.square(z) - log_std - _LOG_SQRT_2PI, axis=-1)


class _Policy(NamedTuple):
    """The policy's distribution over actions given the actor's output ``out``: ``sample(key, out, params) ->
    (action, log_prob)``; ``log_prob(out, params, action) -> (log_prob, dist)`` and ``entropy(dist, params)``,
    the mean entropy over the batch (``dist``: what the log-prob computed that the entropy reuses); ``to_env`` maps
    a sampled action to what ``env.step`` takes."""

    sample: Callable
    log_prob: Callable
    entropy: Callable
    to_env: Callable


def _categorical_policy() -> _Policy:
    def sample(key, logits, params):
        action = jax.random.categorical(key, logits)
        return action, jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=-1)[:, 0]

    def log_prob(logits, params, action):
        log_probs_all = jax.nn.log_softmax(logits)
        return jnp.take_along_axis(log_probs_all, action[:, None], axis=-1)[:, 0], log_probs_all

    def entropy(log_probs_all, params):
        return -jnp.mean(jnp.sum(jnp.exp(log_probs_all) * log_probs_all, axis=-1))

    return _Policy(sample, log_prob, entropy, lambda action: action)


def _gaussian_policy(spec: ActionSpec) -> _Policy:
    """Diagonal Gaussian, state-independent log-std (Schulman et al. 2017, sec. 6.1; PureJaxRL's continuous PPO);
    the env gets the sample clipped to the Box (PureJaxRL's ``ClipAction``), the log-prob stays the sample's."""
    low, high = jnp.asarray(spec.low), jnp.asarray(spec.high)

    def sample(key, mean, params):
        log_std = params["log_std"]
        action = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)
        return action, gaussian_log_prob(mean, log_std, action)

    def log_prob(mean, params, action):
        return gaussian_log_prob(mean, params["log_std"], action), None

    def entropy(_, params):
        return jnp.sum(params["log_std"] + 0.5 + _LOG_SQRT_2PI)  # the same for every state

    def to_env(action):
        return jnp.clip(action, low, high).reshape((action.shape[0], *spec.shape))

    return _Policy(sample, log_prob, entropy, to_env)


def _mlp_apply(layers, x, activation):
    for layer in layers[:-1]:
        x = activation(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


# --------------------------------------------------------------------------- training


class _Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array  # V(obs), filled in after the rollout (one batched critic pass)
    reward: jax.Array  # reward for GAE (truncation-bootstrapped after the rollout)
    done: jax.Array  # terminated | truncated: cut the GAE trace
    ended_return: jax.Array  # return of the episode that ended here, else 0
    ended: jax.Array  # 1.0 where an episode ended on this step
    cut_short: jax.Array  # truncated by the time limit, not terminated: bootstrap with V(final_obs)
    final_obs: jax.Array  # the pre-reset observation ([num_envs, 0] when not bootstrapping)


def env_dims(config: PPOConfig) -> tuple[int, int]:
    """``(obs_dim, num_actions)`` of the policy network: the flattened observation size and the action count
    (a Discrete space) or the action's dimension (a Box)."""
    env, env_params = make_env(config)
    return observation_size(env, env_params), action_spec(env, env_params, config.env_name).size


def progress_at(update_index: Any, steps_per_update: int, total_timesteps: int) -> Progress:
    """TA-LPO's progress at PPO update ``update_index`` (0-based; Jackson et al., ICLR 2024, eq. 10).

    ``n/N`` is the fraction of the run's env-interaction budget elapsed when the update's rollout
    started: ``n = update_index * num_envs * num_steps`` env steps, ``N = total_timesteps`` (so the first
    update sees 0; a budget that is not a multiple of the batch never reaches 1). ``log N`` is
    ``log(total_timesteps)``.
    """
    steps_taken = jnp.asarray(update_index, jnp.float32) * jnp.float32(steps_per_update)
    return Progress(
        fraction=steps_taken / jnp.float32(total_timesteps),
        log_horizon=jnp.float32(math.log(total_timesteps)),
    )


def make_train(config: PPOConfig, drift_fn: DriftFn) -> Callable[[jax.Array, Any], dict]:
    """Build ``train(rng, drift_params) -> metrics``: one full PPO run, pure and jit-able.

    The actor loss is ``-mean(r * A - drift_fn(drift_params, r, A, progress))`` (mirror
    learning, Kuba et al. 2022; Lu et al. 2022 eq. 4) with ``progress = Progress(n / N, log N)``
    from :func:`progress_at` (env steps, Jackson et al. 2024 eq. 10).
    ``rng`` and ``drift_params`` may both be ``jax.vmap``-ed over. Metrics (jax arrays):

    * per update, shape ``[num_updates]``: ``episode_returns`` (mean return of episodes
      completed during the update; carries the previous value where none completed, 0
      before the first), ``episodes_completed``, ``episode_return_sum``, ``actor_loss``,
      ``value_loss``, ``entropy``, ``approx_kl`` (``mean((r - 1) - log r)``),
      ``drift`` (mean drift), ``clip_fraction`` (``mean(|r - 1| > clip_eps)``), ``total_loss``,
      ``learning_rate`` (at the update's first optimiser step);
    * scalar ``final_return``: count-weighted mean return of all episodes completed during the
      last ``max(1, num_updates // 10)`` updates (the ES fitness); if none completed there,
      the last value of ``episode_returns``.
    """
    env, env_params = make_env(config)
    obs_dim = observation_size(env, env_params)
    actions = action_spec(env, env_params, config.env_name)
    dist = _categorical_policy() if actions.discrete else _gaussian_policy(actions)

    num_envs, num_steps = config.num_envs, config.num_steps
    num_updates = config.num_updates
    batch_size, minibatch_size = config.batch_size, config.minibatch_size
    num_minibatches, update_epochs = config.num_minibatches, config.update_epochs
    steps_per_update = update_epochs * num_minibatches
    total_opt_steps = num_updates * steps_per_update
    activation = jnp.tanh if config.activation == "tanh" else jax.nn.relu
    gamma, lam = config.gamma, config.gae_lambda
    tail = max(1, num_updates // 10)

    if config.anneal_lr:

        def lr_at(count):
            return config.lr * (1.0 - jnp.minimum(count, total_opt_steps) / total_opt_steps)
    else:

        def lr_at(count):
            return jnp.full(jnp.shape(count), config.lr, jnp.float32)

    optimizer = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adam(learning_rate=lr_at, eps=1e-5),
    )

    def policy(params, obs):
        return _mlp_apply(params["actor"], obs, activation)

    def value_fn(params, obs):
        return _mlp_apply(params["critic"], obs, activation)[..., 0]

    def flat(obs):
        return obs.reshape(obs.shape[0], obs_dim).astype(jnp.float32)

    reset_batch = jax.vmap(env.reset, in_axes=(0, None))
    step_batch = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def loss_fn(params, batch: _Transition, advantages, targets, drift_params, progress):
        log_prob, action_dist = dist.log_prob(policy(params, batch.obs), params, batch.action)
        log_ratio = log_prob - batch.log_prob
        ratio = jnp.exp(log_ratio)
        if config.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        drift = drift_fn(drift_params, ratio, advantages, progress)
        actor_loss = -jnp.mean(ratio * advantages - drift)

        value = value_fn(params, batch.obs)
        value_err = jnp.square(value - targets)
        if config.clip_value:
            clipped = batch.value + jnp.clip(value - batch.value, -config.clip_eps, config.clip_eps)
            value_err = jnp.maximum(value_err, jnp.square(clipped - targets))
        value_loss = 0.5 * jnp.mean(value_err)

        entropy = dist.entropy(action_dist, params)
        total = actor_loss + config.vf_coef * value_loss - config.ent_coef * entropy
        aux = {
            "total_loss": total,
            "actor_loss": actor_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            "approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
            "drift": jnp.mean(drift),
            "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > config.clip_eps).astype(jnp.float32)),
        }
        return total, aux

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train(rng: jax.Array, drift_params: Any) -> dict:
        rng, k_net, k_reset = jax.random.split(rng, 3)
        params = init_network(k_net, obs_dim, actions.size, config, gaussian=not actions.discrete)
        opt_state = optimizer.init(params)
        obs, env_state = reset_batch(jax.random.split(k_reset, num_envs), env_params)
        obs = flat(obs)
        running_return = jnp.zeros((num_envs,), jnp.float32)

        def env_step(carry, _):
            params, env_state, obs, running_return, rng = carry
            rng, k_act, k_step = jax.random.split(rng, 3)
            action, log_prob = dist.sample(k_act, policy(params, obs), params)
            next_obs, env_state, reward, terminated, truncated, info = step_batch(
                jax.random.split(k_step, num_envs), env_state, dist.to_env(action), env_params
            )
            reward = reward.astype(jnp.float32)
            done = jnp.logical_or(terminated, truncated)
            cut_short = jnp.logical_and(truncated, jnp.logical_not(terminated))
            final_obs = flat(info["final_observation"]) if config.bootstrap_truncation else jnp.zeros((num_envs, 0))
            running_return = running_return + reward
            ended = done.astype(jnp.float32)
            # Values are not computed here: the critic runs once over the whole rollout afterwards (the params do
            # not change during a rollout), which is one large matrix product instead of num_steps small ones.
            transition = _Transition(
                obs=obs,
                action=action,
                log_prob=log_prob,
                value=jnp.zeros_like(reward),
                reward=reward,
                done=ended,
                ended_return=running_return * ended,
                ended=ended,
                cut_short=cut_short,
                final_obs=final_obs,
            )
            running_return = jnp.where(done, 0.0, running_return)
            return (params, env_state, flat(next_obs), running_return, rng), transition

        def with_values(params, traj: _Transition) -> _Transition:
            """V(obs) for every step, and the time-limit bootstrap ``r + gamma * V(final_obs)``, in batched passes."""
            reward = traj.reward
            if config.bootstrap_truncation:
                reward = reward + gamma * jnp.where(traj.cut_short, value_fn(params, traj.final_obs), 0.0)
            # final_obs is no longer needed: drop it so the minibatch shuffles do not gather it every epoch.
            return traj._replace(value=value_fn(params, traj.obs), reward=reward, final_obs=traj.final_obs[..., :0])

        def gae(traj: _Transition, last_value):
            def back(carry, t: _Transition):
                next_adv, next_value = carry
                not_done = 1.0 - t.done
                delta = t.reward + gamma * next_value * not_done - t.value
                adv = delta + gamma * lam * not_done * next_adv
                return (adv, t.value), adv

            _, advantages = jax.lax.scan(back, (jnp.zeros_like(last_value), last_value), traj, reverse=True)
            return advantages, advantages + traj.value

        def update(carry, update_index):
            params, opt_state, env_state, obs, running_return, last_mean, rng = carry
            (params, env_state, obs, running_return, rng), traj = jax.lax.scan(
                env_step, (params, env_state, obs, running_return, rng), None, length=num_steps
            )
            traj = with_values(params, traj)
            advantages, targets = gae(traj, value_fn(params, obs))
            progress = progress_at(update_index, num_envs * num_steps, config.total_timesteps)
            lr_now = lr_at(update_index * steps_per_update)
            data = (traj, advantages, targets)
            data = jax.tree.map(lambda x: x.reshape((batch_size, *x.shape[2:])), data)

            def epoch(carry, _):
                params, opt_state, rng = carry
                rng, k_perm = jax.random.split(rng)
                perm = jax.random.permutation(k_perm, batch_size)
                shuffled = jax.tree.map(
                    lambda x: x[perm].reshape((num_minibatches, minibatch_size, *x.shape[1:])), data
                )

                def minibatch(carry, mb):
                    params, opt_state = carry
                    batch, adv, tgt = mb
                    grads, aux = grad_fn(params, batch, adv, tgt, drift_params, progress)
                    updates, opt_state = optimizer.update(grads, opt_state, params)
                    return (optax.apply_updates(params, updates), opt_state), aux

                (params, opt_state), aux = jax.lax.scan(minibatch, (params, opt_state), shuffled)
                return (params, opt_state, rng), aux

            (params, opt_state, rng), aux = jax.lax.scan(epoch, (params, opt_state, rng), None, length=update_epochs)
            metrics = jax.tree.map(jnp.mean, aux)
            count = traj.ended.sum()
            return_sum = traj.ended_return.sum()
            mean_return = jnp.where(count > 0, return_sum / jnp.maximum(count, 1.0), last_mean)
            metrics.update(
                episode_returns=mean_return,
                episodes_completed=count,
                episode_return_sum=return_sum,
                learning_rate=jnp.asarray(lr_now, jnp.float32),
            )
            return (params, opt_state, env_state, obs, running_return, mean_return, rng), metrics

        carry = (params, opt_state, env_state, obs, running_return, jnp.float32(0.0), rng)
        _, metrics = jax.lax.scan(update, carry, jnp.arange(num_updates))
        tail_count = metrics["episodes_completed"][-tail:].sum()
        tail_sum = metrics["episode_return_sum"][-tail:].sum()
        metrics["final_return"] = jnp.where(
            tail_count > 0, tail_sum / jnp.maximum(tail_count, 1.0), metrics["episode_returns"][-1]
        )
        return metrics

    return train


@functools.lru_cache(maxsize=8)
def _population_fn(config: PPOConfig, drift_fn: DriftFn, common_seeds: bool, env_code: str = ""):
    """The jitted population program; ``env_code`` (:func:`~metaopt.objectives.envs.code_fingerprint`) is only
    part of the cache key: a user env's module edited since builds a new program."""
    over_seeds = jax.vmap(make_train(config, drift_fn), in_axes=(0, None))
    return jax.jit(jax.vmap(over_seeds, in_axes=(None if common_seeds else 0, 0)))


def train_many(
    config: PPOConfig,
    drift_fn: DriftFn,
    rng: jax.Array,
    drift_params_batch: Any,
    seeds_per_member: int,
    *,
    common_seeds: bool = True,
    full_metrics: bool = False,
):
    """Train every population member on ``seeds_per_member`` seeds, jitted and vmapped.

    ``drift_params_batch`` is a pytree whose leaves have a leading member axis ``M``.
    With ``common_seeds`` (default) every member uses the same seeds, the keys
    ``jax.random.split(rng, seeds_per_member)`` (common random numbers, which lower the variance
    of fitness *differences* in ES); otherwise member ``m`` uses
    ``jax.random.split(rng, (M, seeds_per_member))[m]``.
    Returns ``final_return`` of shape ``[M, seeds_per_member]``, or the whole metrics dict
    (leaves ``[M, seeds, ...]``) with ``full_metrics``. The jitted function is cached per
    ``(config, drift_fn)`` (both must be hashable; a new lambda per call recompiles) and a user env's
    module file (its edits recompile), so repeated ES generations compile once. Results match per-seed
    ``make_train`` calls up to float rounding (batched matmuls), which long, chaotic runs can amplify.
    """
    if isinstance(seeds_per_member, bool) or not isinstance(seeds_per_member, int) or seeds_per_member < 1:
        raise ConfigError("seeds_per_member", f"must be an integer >= 1, got {seeds_per_member!r}")
    leaves = jax.tree.leaves(drift_params_batch)
    if not leaves:
        raise ConfigError("drift_params_batch", "needs at least one array leaf with a leading member axis")
    members = leaves[0].shape[0]
    if common_seeds:
        keys = jax.random.split(rng, seeds_per_member)
    else:
        keys = jax.random.split(rng, (members, seeds_per_member))
    program = _population_fn(config, drift_fn, common_seeds, code_fingerprint(config.env_name))
    metrics = program(keys, drift_params_batch)
    return metrics if full_metrics else metrics["final_return"]
