"""Env-steps per second of our JAX PPO (PPO drift, LPO drift) against a plain single-file JAX PPO.

    .venv/bin/python benchmarks/ppo_throughput.py [--timesteps-cartpole 200000]
        [--timesteps-minatar 100000] [--repeats 3] [--seed 0] [--quick] [--diagnose]

Three variants per environment (CartPole-v1, SpaceInvaders-MinAtar), one seed each, all jitted:

* ``ours-ppo``: ``metaopt.objectives.ppo.make_train(ppo_config_for(env, ...), drift_fn)`` with
  ``make_drift("ppo")`` (the clipped surrogate written as a mirror-learning drift).
* ``ours-lpo``: the same with ``make_drift("lpo", hidden=128)`` and its all-zero parameters (a trained
  LPO network does the same arithmetic, so its cost is the same).
* ``reference``: :func:`make_reference_train` below, a straightforward PPO written directly in this file
  (no ``metaopt`` code): separate actor and critic MLPs, rollout ``lax.scan``, GAE, minibatch epochs, the
  clipped surrogate and PPO2's clipped value loss, Adam after global-norm clipping, linearly annealed lr.

Every variant uses the same hyperparameters: 4 envs x 128 steps, 4 epochs, 4 minibatches, gamma 0.99,
lambda 0.95, clip 0.2, ent 0.01, vf 0.5, grad-norm 0.5, and the per-env learning rate, activation and
network size of ``ppo_config_for`` (CartPole: tanh 64x2, lr 2.5e-3; SpaceInvaders: relu 64x2, lr 7e-3);
initialisation is variance-scaling normal in both (He for relu, LeCun for tanh, policy head x0.01; no
orthogonal init: a vmap over JAX 0.10's QR initializer can deadlock on 2 CPU threads). One difference is
kept on purpose: ours bootstraps time-limit truncation (one more critic pass per env step, on
``info["final_observation"]``), the reference does not, as in most single-file PPOs. ``--diagnose`` adds a
fourth variant, ``ours-ppo-noboot`` (ours-ppo with ``bootstrap_truncation=False``), to show what that costs.

Compile time (``jax.jit(f).lower(...).compile()``, tracing included) is measured once per variant; run
time is the best of ``--repeats`` calls of the compiled function (``jax.block_until_ready``), with the
three variants interleaved inside each repeat so load drift on a shared machine hits them alike.
env-steps/s = ``num_updates * 4 * 128 / run s``. Final return (mean return of the episodes completed in
the last 10% of updates) is a sanity check that each variant learns CartPole (random play: ~20).

Printed: the table, per env the ratios ours-ppo/reference and ours-lpo/reference in env-steps/s (goal
>= 1.0) and the LPO drift's extra run time over ours-ppo (goal <= 10%), the load average before and
after, and as the last line ``ratio: X.XX`` = env-steps/s of ours-lpo / reference on CartPole.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import gymnax
import jax
import jax.numpy as jnp
import optax

from metaopt.objectives.drifts import make_drift
from metaopt.objectives.ppo import make_train, ppo_config_for
from results import append, command_line  # benchmarks/ is on sys.path when a script here runs

ENVS = ("CartPole-v1", "SpaceInvaders-MinAtar")
VARIANTS = ("ours-ppo", "ours-lpo", "reference")
DIAGNOSTIC = "ours-ppo-noboot"  # --diagnose: ours-ppo without the truncation bootstrap (as the reference)
SHARED = {  # hyperparameters every variant uses (the per-env lr/activation/hidden come from ppo_config_for)
    "num_envs": 4,
    "num_steps": 128,
    "update_epochs": 4,
    "num_minibatches": 4,
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "clip_eps": 0.2,
    "ent_coef": 0.01,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
    "anneal_lr": True,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timesteps-cartpole", type=int, default=200_000)
    p.add_argument("--timesteps-minatar", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant after compile (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: CartPole 2e4 and SpaceInvaders 1e4 steps, 2 repeats"
    )
    p.add_argument(
        "--diagnose", action="store_true", help=f"also time {DIAGNOSTIC} (ours-ppo with bootstrap_truncation=False)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.timesteps_cartpole, args.timesteps_minatar, args.repeats = 20_000, 10_000, 2
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


# --------------------------------------------------------------------------- reference PPO (no metaopt code)


def _dense_init(key, fan_in, fan_out, scale):
    """Variance-scaling normal: w ~ N(0, scale / fan_in), zero bias."""
    w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) * math.sqrt(scale / fan_in)
    return w, jnp.zeros((fan_out,), jnp.float32)


def _mlp(key, sizes, hidden_scale, head_scale):
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        layers.append(_dense_init(k, fan_in, fan_out, head_scale if i == len(sizes) - 2 else hidden_scale))
    return layers


def _forward(layers, x, act):
    for w, b in layers[:-1]:
        x = act(x @ w + b)
    w, b = layers[-1]
    return x @ w + b


def make_reference_train(
    env_name,
    total_timesteps,
    *,
    lr,
    hidden,
    activation,
    num_envs,
    num_steps,
    update_epochs,
    num_minibatches,
    gamma,
    gae_lambda,
    clip_eps,
    ent_coef,
    vf_coef,
    max_grad_norm,
    anneal_lr=True,
    layers=2,
):
    """A plain PPO: ``train(rng) -> (returns per update, final return)``."""
    env, env_params = gymnax.make(env_name)
    obs_shape = env.observation_space(env_params).shape
    obs_dim = math.prod(obs_shape)
    n_actions = env.action_space(env_params).n
    act = jnp.tanh if activation == "tanh" else jax.nn.relu
    hidden_scale = 1.0 if activation == "tanh" else 2.0
    batch = num_envs * num_steps
    mb_size = batch // num_minibatches
    n_updates = total_timesteps // batch
    total_opt_steps = n_updates * update_epochs * num_minibatches
    schedule = optax.linear_schedule(lr, 0.0, total_opt_steps) if anneal_lr else lr
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(schedule, eps=1e-5))
    last_updates = max(1, n_updates // 10)

    def train(rng):
        rng, k_actor, k_critic, k_env = jax.random.split(rng, 4)
        sizes = [obs_dim] + [hidden] * layers
        params = {
            "actor": _mlp(k_actor, [*sizes, n_actions], hidden_scale, 0.01**2),
            "critic": _mlp(k_critic, [*sizes, 1], hidden_scale, 1.0),
        }
        opt_state = tx.init(params)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_env, num_envs), env_params)
        obs = obs.reshape(num_envs, -1).astype(jnp.float32)

        def one_update(carry, _):
            params, opt_state, env_state, obs, ep_ret, rng = carry

            def step(carry, _):
                env_state, obs, ep_ret, rng = carry
                rng, k_a, k_s = jax.random.split(rng, 3)
                logits = _forward(params["actor"], obs, act)
                value = _forward(params["critic"], obs, act)[:, 0]
                action = jax.random.categorical(k_a, logits)
                logp = jax.nn.log_softmax(logits)[jnp.arange(num_envs), action]
                nobs, env_state, reward, term, trunc, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                    jax.random.split(k_s, num_envs), env_state, action, env_params
                )
                done = (term | trunc).astype(jnp.float32)
                ep_ret = ep_ret + reward
                out = (obs, action, logp, value, reward, done, ep_ret * done)
                ep_ret = ep_ret * (1.0 - done)
                return (env_state, nobs.reshape(num_envs, -1).astype(jnp.float32), ep_ret, rng), out

            (env_state, obs, ep_ret, rng), traj = jax.lax.scan(
                step, (env_state, obs, ep_ret, rng), None, length=num_steps
            )
            t_obs, t_act, t_logp, t_val, t_rew, t_done, t_ended = traj

            last_val = _forward(params["critic"], obs, act)[:, 0]

            def gae_step(carry, x):
                adv_next, val_next = carry
                rew, val, done = x
                delta = rew + gamma * val_next * (1.0 - done) - val
                adv = delta + gamma * gae_lambda * (1.0 - done) * adv_next
                return (adv, val), adv

            _, adv = jax.lax.scan(gae_step, (jnp.zeros(num_envs), last_val), (t_rew, t_val, t_done), reverse=True)
            ret = adv + t_val
            data = (t_obs, t_act, t_logp, t_val, adv, ret)
            data = jax.tree.map(lambda x: x.reshape((batch, *x.shape[2:])), data)

            def loss(params, mb):
                o, a, old_logp, old_v, adv, ret = mb
                logp_all = jax.nn.log_softmax(_forward(params["actor"], o, act))
                logp = logp_all[jnp.arange(mb_size), a]
                ratio = jnp.exp(logp - old_logp)
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
                policy_loss = -surrogate.mean()
                v = _forward(params["critic"], o, act)[:, 0]
                v_clipped = old_v + jnp.clip(v - old_v, -clip_eps, clip_eps)
                value_loss = 0.5 * jnp.maximum((v - ret) ** 2, (v_clipped - ret) ** 2).mean()
                entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
                return policy_loss + vf_coef * value_loss - ent_coef * entropy

            def epoch(carry, _):
                params, opt_state, rng = carry
                rng, k = jax.random.split(rng)
                perm = jax.random.permutation(k, batch)
                mbs = jax.tree.map(lambda x: x[perm].reshape((num_minibatches, mb_size, *x.shape[1:])), data)

                def minibatch(carry, mb):
                    params, opt_state = carry
                    grads = jax.grad(loss)(params, mb)
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return (optax.apply_updates(params, updates), opt_state), None

                (params, opt_state), _ = jax.lax.scan(minibatch, (params, opt_state), mbs)
                return (params, opt_state, rng), None

            (params, opt_state, rng), _ = jax.lax.scan(epoch, (params, opt_state, rng), None, length=update_epochs)
            stats = (t_ended.sum(), t_done.sum())
            return (params, opt_state, env_state, obs, ep_ret, rng), stats

        carry = (params, opt_state, env_state, obs, jnp.zeros(num_envs), rng)
        _, (ret_sums, counts) = jax.lax.scan(one_update, carry, None, length=n_updates)
        final = ret_sums[-last_updates:].sum() / jnp.maximum(counts[-last_updates:].sum(), 1.0)
        return ret_sums / jnp.maximum(counts, 1.0), final

    return train, n_updates * batch


# --------------------------------------------------------------------------- benchmark


def build_variants(env_name, timesteps, seed, variants=VARIANTS):
    """``{variant: (compiled_fn, args, final_return_of(output), env_steps)}`` plus compile seconds."""
    config = ppo_config_for(env_name, total_timesteps=timesteps, **SHARED)
    rng = jax.random.PRNGKey(seed)
    compiled, compile_s = {}, {}
    for variant in variants:
        if variant == "reference":
            fn, steps = make_reference_train(
                env_name,
                timesteps,
                lr=config.lr,
                hidden=config.hidden,
                activation=config.activation,
                layers=config.layers,
                **SHARED,
            )
            args = (rng,)

            def final_of(out):
                return float(out[1])
        else:
            drift_fn, drift_params = make_drift("lpo", hidden=128) if variant == "ours-lpo" else make_drift("ppo")
            cfg = (
                ppo_config_for(env_name, total_timesteps=timesteps, **SHARED, bootstrap_truncation=False)
                if variant == DIAGNOSTIC
                else config
            )
            fn, steps = make_train(cfg, drift_fn), cfg.num_updates * cfg.batch_size
            args = (rng, drift_params)

            def final_of(out):
                return float(out["final_return"])

        start = time.perf_counter()
        exe = jax.jit(fn).lower(*args).compile()
        compile_s[variant] = time.perf_counter() - start
        compiled[variant] = (exe, args, final_of, steps)
    return compiled, compile_s


def loadavg():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    args = parse_args(argv)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; load average (1/5/15 min) "
        f"at start: {loadavg()}",
        flush=True,
    )
    timesteps = {"CartPole-v1": args.timesteps_cartpole, "SpaceInvaders-MinAtar": args.timesteps_minatar}
    variants = VARIANTS + ((DIAGNOSTIC,) if args.diagnose else ())
    rows = {}
    for env_name in ENVS:
        compiled, compile_s = build_variants(env_name, timesteps[env_name], args.seed, variants)
        best = dict.fromkeys(variants, math.inf)
        best_cpu = dict.fromkeys(variants, math.inf)
        finals = {}
        for rep in range(args.repeats):
            for variant in variants:  # interleaved: each repeat runs every variant back to back
                exe, call_args, final_of, _ = compiled[variant]
                start, start_cpu = time.perf_counter(), time.process_time()
                out = jax.block_until_ready(exe(*call_args))
                best[variant] = min(best[variant], time.perf_counter() - start)
                best_cpu[variant] = min(best_cpu[variant], time.process_time() - start_cpu)
                finals[variant] = final_of(out)
            print(f"  {env_name} repeat {rep + 1}/{args.repeats} done, load {loadavg()}", flush=True)
        for variant in variants:
            steps = compiled[variant][3]
            rows[env_name, variant] = (
                compile_s[variant],
                best[variant],
                steps / best[variant],
                finals[variant],
                steps,
                best_cpu[variant],
            )

    print()
    print(
        f"{'env':<22} {'variant':<15} {'steps':>8} {'compile s':>10} {'run s':>8} {'env-steps/s':>12} "
        f"{'final return':>13} {'cpu s':>7}"
    )
    for (env_name, variant), (comp, run, sps, final, steps, cpu) in rows.items():
        print(
            f"{env_name:<22} {variant:<15} {steps:>8d} {comp:>10.2f} {run:>8.2f} {sps:>12,.0f} {final:>13.1f} "
            f"{cpu:>7.2f}"
        )
    print()
    for env_name in ENVS:
        ref = rows[env_name, "reference"][2]
        ppo_sps, lpo_sps = rows[env_name, "ours-ppo"][2], rows[env_name, "ours-lpo"][2]
        lpo_cost = rows[env_name, "ours-lpo"][1] / rows[env_name, "ours-ppo"][1] - 1.0
        print(
            f"{env_name}: ours-ppo/reference {ppo_sps / ref:.2f}x, ours-lpo/reference {lpo_sps / ref:.2f}x "
            f"(goal >= 1.0); LPO drift cost vs ours-ppo {100 * lpo_cost:+.1f}% run time (goal <= 10%)"
        )
        cpu = {v: rows[env_name, v][5] for v in variants}
        print(
            f"  by process CPU time (less sensitive to other load): ours-ppo/reference "
            f"{cpu['reference'] / cpu['ours-ppo']:.2f}x, "
            f"ours-lpo/reference {cpu['reference'] / cpu['ours-lpo']:.2f}x, "
            f"LPO drift cost {100 * (cpu['ours-lpo'] / cpu['ours-ppo'] - 1):+.1f}%"
        )
        if args.diagnose:
            print(
                f"  {DIAGNOSTIC}/reference {rows[env_name, DIAGNOSTIC][2] / ref:.2f}x; truncation bootstrap cost "
                f"{100 * (rows[env_name, 'ours-ppo'][1] / rows[env_name, DIAGNOSTIC][1] - 1):+.1f}% run time"
            )
    random_level = 25.0
    for variant in variants:
        final = rows["CartPole-v1", variant][3]
        if not final > 2 * random_level:
            print(f"WARNING: {variant} CartPole final return {final:.1f} is not clearly above random (~20)")
    print(f"load average (1/5/15 min) at end: {loadavg()}")
    ratio = rows["CartPole-v1", "ours-lpo"][2] / rows["CartPole-v1", "reference"][2]
    for env_name in ENVS:
        append(
            "ppo_throughput",
            f"{env_name} ours-ppo/reference",
            rows[env_name, "ours-ppo"][2] / rows[env_name, "reference"][2],
            command_line(argv),
        )
    append("ppo_throughput", "ratio", ratio, command_line(argv))
    print(f"ratio: {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
