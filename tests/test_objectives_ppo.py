"""metaopt.objectives.ppo: the JAX PPO whose actor loss takes any mirror-learning drift.

Each distinct config (and each batch shape) costs one XLA compile (~5-7 s of CPU here), so the
tests share four compiled programs: a small CartPole config that learns (also used for
determinism), a tiny Acrobot config run per call and vmapped over seeds x drift members,
and one tiny MinAtar Breakout run.
"""

from __future__ import annotations

import faulthandler
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError

from metaopt.objectives.ppo import (
    PPO_REFERENCE_LR,
    TUNED_ENVS,
    PPOConfig,
    Progress,
    env_dims,
    make_train,
    ppo_clip_drift,
    ppo_config_for,
    train_many,
)

PER_UPDATE = (
    "episode_returns",
    "episodes_completed",
    "episode_return_sum",
    "actor_loss",
    "value_loss",
    "entropy",
    "approx_kl",
    "drift",
    "clip_fraction",
    "total_loss",
    "learning_rate",
)


def clip_drift(params, r, a, progress):
    """PPO's clip written as a drift (Lu et al. 2022, eq. 3): relu((r - clip(r)) * A)."""
    return jax.nn.relu((r - jnp.clip(r, 1 - 0.2, 1 + 0.2)) * a)


class _Watchdog:
    """Kill the process with a traceback instead of hanging forever (vmap deadlock guard)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        faulthandler.dump_traceback_later(self.seconds, exit=True)

    def __exit__(self, *exc):
        faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------- CartPole learns

LEARN_CONFIG = ppo_config_for("CartPole-v1", num_envs=4, num_steps=128, total_timesteps=30_720)
LEARN_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def learn_runs():
    train = jax.jit(make_train(LEARN_CONFIG, clip_drift))
    runs = {seed: jax.device_get(train(jax.random.key(seed), None)) for seed in LEARN_SEEDS}
    again = jax.device_get(train(jax.random.key(0), None))
    return runs, again


def test_clip_drift_ppo_learns_cartpole(learn_runs):
    runs, _ = learn_runs
    assert LEARN_CONFIG.num_updates == 60
    finals = np.array([float(runs[s]["final_return"]) for s in LEARN_SEEDS])
    starts = np.array([float(runs[s]["episode_returns"][:3].mean()) for s in LEARN_SEEDS])
    # A uniform-random CartPole policy averages ~22; the first updates are near it.
    assert np.all(starts < 60), starts
    # 32 seeds of this config ended between 198 and 500 when it was tuned.
    assert np.all(finals > 100), finals
    assert finals.mean() > 150, finals


def test_metrics_shapes_and_finite(learn_runs):
    runs, _ = learn_runs
    m = runs[0]
    for key in PER_UPDATE:
        assert m[key].shape == (LEARN_CONFIG.num_updates,), key
        assert np.all(np.isfinite(m[key])), key
    assert m["final_return"].shape == ()
    # final_return is the count-weighted mean over the last max(1, N // 10) updates.
    tail = max(1, LEARN_CONFIG.num_updates // 10)
    expected = m["episode_return_sum"][-tail:].sum() / m["episodes_completed"][-tail:].sum()
    np.testing.assert_allclose(m["final_return"], expected, rtol=1e-6)
    # Annealed learning rate: starts at lr and decays linearly towards 0.
    np.testing.assert_allclose(m["learning_rate"][0], LEARN_CONFIG.lr, rtol=1e-6)
    assert np.all(np.diff(m["learning_rate"]) < 0) and m["learning_rate"][-1] < LEARN_CONFIG.lr / 10
    assert np.all(m["drift"] >= 0) and m["drift"].max() > 0
    assert np.all(m["entropy"] > 0) and m["entropy"][0] > m["entropy"][-1]


def test_same_rng_same_metrics_different_rng_different(learn_runs):
    runs, again = learn_runs
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], again[key], err_msg=key)
    assert not np.array_equal(runs[0]["episode_returns"], runs[1]["episode_returns"])
    assert not np.array_equal(runs[0]["actor_loss"], runs[1]["actor_loss"])


# ---------------------------------------------------------------------- vmap and drifts
# Tiny Acrobot runs (this also covers "Acrobot-v1 runs"). Compared over only 4 updates:
# batched and unbatched float math differ in the last bits, and RL training is chaotic.

TINY = ppo_config_for(
    "Acrobot-v1",
    num_envs=4,
    num_steps=32,
    total_timesteps=4 * 32 * 4,
    num_minibatches=2,
    update_epochs=4,
    lr=1e-2,
)
# Members: the zero drift (unclipped objective), PPO's clip, and a constant drift n / N
# (no gradient: it learns exactly like the zero drift, and reads `progress` back).
MEMBERS = {"scale": jnp.array([0.0, 1.0, 0.0]), "offset": jnp.array([0.0, 0.0, 1.0])}
ZERO, CLIP, OFFSET = 0, 1, 2


def member_drift(params, r, a, progress):
    assert isinstance(progress, Progress)
    assert progress.fraction.shape == () and progress.fraction.dtype == jnp.float32
    assert progress.log_horizon.shape == () and progress.log_horizon.dtype == jnp.float32
    return params["scale"] * clip_drift(None, r, a, progress) + params["offset"] * progress.fraction


@pytest.fixture(scope="module")
def tiny_runs():
    single = jax.jit(make_train(TINY, member_drift))
    keys = jax.random.split(jax.random.key(3), 2)  # train_many's documented seed derivation
    per_call = {
        (m, s): jax.device_get(single(keys[s], {name: value[m] for name, value in MEMBERS.items()}))
        for m in range(3)
        for s in range(2)
    }
    with _Watchdog(300):  # vmap over seeds and members must not deadlock (no orthogonal init)
        batched = jax.device_get(train_many(TINY, member_drift, jax.random.key(3), MEMBERS, 2, full_metrics=True))
    return per_call, batched


def test_vmap_over_seeds_and_members_matches_per_call(tiny_runs):
    per_call, batched = tiny_runs
    for key, value in batched.items():
        assert value.shape[:2] == (3, 2), key
        assert np.all(np.isfinite(value)), key
        for (m, s), metrics in per_call.items():
            np.testing.assert_allclose(value[m, s], metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert not np.array_equal(batched["actor_loss"][CLIP, 0], batched["actor_loss"][CLIP, 1])


def test_zero_drift_is_unclipped_and_differs_from_clip(tiny_runs):
    _, batched = tiny_runs
    assert np.all(batched["drift"][ZERO] == 0)
    assert batched["drift"][CLIP].max() > 0
    # Same seeds, same first rollout: the first update differs only through the drift.
    np.testing.assert_array_equal(batched["entropy"][ZERO, :, 0] > 0, True)
    np.testing.assert_array_equal(batched["episodes_completed"][ZERO, :, 0], batched["episodes_completed"][CLIP, :, 0])
    assert not np.allclose(batched["actor_loss"][ZERO], batched["actor_loss"][CLIP])
    # Without the clip the policy moves further from the rollout policy in the first update.
    assert np.all(batched["approx_kl"][ZERO, :, 0] > batched["approx_kl"][CLIP, :, 0])


def test_progress_reaches_the_drift(tiny_runs):
    _, batched = tiny_runs
    # n/N = env steps before update k's rollout / total env steps (Jackson et al. 2024, eq. 10)
    fraction = np.arange(TINY.num_updates) * TINY.num_envs * TINY.num_steps / TINY.total_timesteps
    np.testing.assert_allclose(batched["drift"][OFFSET], np.broadcast_to(fraction, (2, 4)), rtol=1e-6, atol=1e-7)
    # A constant drift has no gradient: same learning as the zero drift, loss shifted by n / N.
    np.testing.assert_allclose(batched["approx_kl"][OFFSET], batched["approx_kl"][ZERO], rtol=1e-5, atol=1e-7)
    shift = batched["actor_loss"][OFFSET] - batched["actor_loss"][ZERO]
    np.testing.assert_allclose(shift, np.broadcast_to(fraction, (2, 4)), atol=1e-5)


def test_train_many_default_returns_final_return(tiny_runs):
    _, batched = tiny_runs
    fitness = train_many(TINY, member_drift, jax.random.key(3), MEMBERS, 2)  # cached: no recompile
    assert fitness.shape == (3, 2)
    np.testing.assert_allclose(fitness, batched["final_return"], rtol=1e-6)


def test_acrobot_dims_and_returns(tiny_runs):
    _, batched = tiny_runs
    assert env_dims(TINY) == (6, 3)
    # Acrobot pays -1 per step, so returns are <= 0; an update in which no episode ended
    # carries the previous value (0 before the first completion), never NaN.
    assert np.all(batched["episode_returns"] <= 0)
    assert np.all(batched["episodes_completed"] >= 0)


# ---------------------------------------------------------------------- MinAtar


def test_minatar_breakout_runs_with_flattened_obs():
    assert env_dims(ppo_config_for("Breakout-MinAtar")) == (10 * 10 * 4, 3)
    cfg = ppo_config_for(
        "Breakout-MinAtar", num_envs=4, num_steps=16, total_timesteps=2 * 4 * 16, num_minibatches=2, update_epochs=1
    )
    assert cfg.activation == "relu" and cfg.lr == PPO_REFERENCE_LR["Breakout-MinAtar"]
    metrics = jax.device_get(jax.jit(make_train(cfg, clip_drift))(jax.random.key(0), None))
    assert cfg.num_updates == 2
    for key in PER_UPDATE:
        assert metrics[key].shape == (2,) and np.all(np.isfinite(metrics[key])), key
    assert np.isfinite(metrics["final_return"])
    assert np.all(metrics["entropy"] > 0.9 * math.log(3))  # near-uniform initial policy


# ---------------------------------------------------------------------- config


def test_defaults():
    minatar = ppo_config_for("Asterix-MinAtar")
    assert (minatar.num_envs, minatar.num_steps, minatar.update_epochs, minatar.num_minibatches) == (64, 128, 4, 8)
    assert (minatar.hidden, minatar.layers, minatar.activation, minatar.anneal_lr) == (64, 2, "relu", True)
    assert minatar.lr == 3e-3
    cartpole = ppo_config_for("CartPole-v1", lr=1e-3)
    assert cartpole.activation == "tanh" and cartpole.lr == 1e-3
    assert PPOConfig().num_updates == 100_000 // (8 * 128)
    assert set(PPO_REFERENCE_LR) <= set(TUNED_ENVS)
    assert hash(PPOConfig(env_params={"max_steps_in_episode": 200})) == hash(
        PPOConfig(env_params=(("max_steps_in_episode", 200),))
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"env_name": "Pendulum-v5"}, "env_name"),
        ({"env_name": "NoSuchEnv"}, "env_name"),
        ({"num_envs": 0}, "num_envs"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"num_minibatches": 3}, "num_minibatches"),
        ({"total_timesteps": 100}, "total_timesteps"),
        ({"gamma": 1.5}, "gamma"),
        ({"gae_lambda": -0.1}, "gae_lambda"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"clip_eps": 0.0}, "clip_eps"),
        ({"ent_coef": -0.01}, "ent_coef"),
        ({"activation": "gelu"}, "activation"),
        ({"layers": 0}, "layers"),
        ({"anneal_lr": "yes"}, "anneal_lr"),
        ({"env_params": {"no_such_param": 1}}, "env_params"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}") as err:  # fields are plain identifiers: no regex escapes
        PPOConfig(**kwargs)
    assert "\n" not in str(err.value), err.value


def test_bad_env_lists_allowed_and_ppo_config_for_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"did you mean CartPole-v1.*gymnax.registered_envs"):
        ppo_config_for("CartPole-v2")
    with pytest.raises(ValueError, match=r"^learning_rate"):
        ppo_config_for("CartPole-v1", learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"^seeds_per_member"):
        train_many(TINY, member_drift, jax.random.key(0), MEMBERS, 0)


def test_equal_configs_are_one_static_jit_argument_and_one_train_many_program(monkeypatch):
    """PPOConfig is a frozen pydantic model: equal settings (however written) hash and compare equal, so a jit
    that takes it as a static argument traces once, and train_many's compile cache (keyed on the config) hits."""
    from metaopt.objectives import ppo

    first = ppo_config_for(
        "Acrobot-v1", num_envs=4, num_steps=32, total_timesteps=256, env_params={"max_steps_in_episode": 50}
    )
    again = ppo_config_for(
        "Acrobot-v1", total_timesteps=256, num_steps=32, num_envs=4, env_params=[("max_steps_in_episode", 50)]
    )
    assert first is not again and first == again and hash(first) == hash(again)
    with pytest.raises(ValidationError, match="frozen"):  # a config cannot change under a compiled program
        first.lr = 1.0
    traces = []

    @jax.jit
    def scaled(x):
        return x

    step = jax.jit(lambda config, x: traces.append(config.num_envs) or scaled(x) * config.lr, static_argnums=0)
    step(first, 1.0)
    step(again, 2.0)
    step(first.model_copy(), 3.0)
    assert traces == [4]
    step(ppo_config_for("Acrobot-v1", num_envs=8, num_steps=32, total_timesteps=256), 1.0)
    assert traces == [4, 8]

    built = []
    monkeypatch.setattr(
        ppo, "make_train", lambda config, drift_fn: built.append(config) or (lambda rng, p: {"final_return": p["x"]})
    )
    ppo._population_fn.cache_clear()
    members = {"x": jnp.arange(2.0)}
    assert train_many(first, member_drift, jax.random.key(0), members, 1).shape == (2, 1)
    train_many(again, member_drift, jax.random.key(1), members, 1)
    assert built == [first] and ppo._population_fn.cache_info().hits == 1
    ppo._population_fn.cache_clear()


def test_ppo_clip_drift_matches_the_clipped_surrogate():
    r = jnp.linspace(0.5, 1.5, 11)
    for a in (-1.3, 0.0, 2.0):
        adv = jnp.full_like(r, a)
        drift = ppo_clip_drift(0.2)(None, r, adv, None)
        clipped_surrogate = jnp.minimum(r * adv, jnp.clip(r, 0.8, 1.2) * adv)
        np.testing.assert_allclose(r * adv - drift, clipped_surrogate, rtol=1e-6, atol=1e-7)
        assert np.all(drift >= 0)
    assert ppo_clip_drift(0.2) == ppo_clip_drift(0.2) and hash(ppo_clip_drift(0.2)) == hash(ppo_clip_drift(0.2))


def test_progress_counts_env_steps_of_the_whole_budget():
    """TA-LPO's n/N (Jackson et al. 2024, eq. 10): update k sees k * num_envs * num_steps / total_timesteps, also
    when the budget is not a multiple of the batch (the fraction then never reaches 1); log N = log(total)."""
    from metaopt.objectives.ppo import progress_at

    config = ppo_config_for("CartPole-v1", num_envs=4, num_steps=32, total_timesteps=1000, num_minibatches=2)
    assert config.num_updates == 7
    for k in range(config.num_updates):
        progress = progress_at(jnp.int32(k), config.num_envs * config.num_steps, config.total_timesteps)
        assert float(progress.fraction) == pytest.approx(k * 4 * 32 / 1000, rel=1e-6)
        assert float(progress.log_horizon) == pytest.approx(math.log(1000), rel=1e-6)
