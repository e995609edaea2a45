"""Learned objectives on any gymnax env, on a user's own env, and with continuous actions (issue 22, item 4).

The JAX PPO picks its policy from the env's action space (Discrete -> categorical, Box -> diagonal Gaussian);
any id of ``gymnax.registered_envs`` trains (generic defaults outside our tuned table); ``env: module:function``
names the user's factory, checked (built, reset and stepped once under jit) before Ray starts. Each distinct
PPO config costs one XLA compile, so the sizes here are the smallest that still show behaviour.
"""

from __future__ import annotations

import math
import shutil
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax.scipy.stats import norm
from scipy import stats

from conftest import run_metaopt_from
from metaopt import cli, user_code
from metaopt.config import from_dict
from metaopt.errors import ConfigError
from metaopt.objectives import ppo
from metaopt.objectives.drifts import make_drift
from metaopt.objectives.envs import action_spec, make_env
from metaopt.objectives.ppo import env_dims, gaussian_log_prob, make_train, ppo_clip_drift, ppo_config_for
from metaopt.objectives.ppo_settings import PPOConfig, PPOSettings, env_label

REPO = Path(__file__).resolve().parents[1]
OWN_ENV_EXAMPLE = REPO / "examples" / "own_env"

# ---------------------------------------------------------------------- the Gaussian policy


def test_gaussian_log_prob_is_the_joint_density_of_jax_scipy_norm():
    """The ratio the drift sees must be the joint pi(a|s)/pi_old(a|s): log-probs summed over action dims."""
    keys = jax.random.split(jax.random.key(0), 3)
    mean = jax.random.normal(keys[0], (5, 3))
    log_std = jnp.array([-0.5, 0.0, 0.7])
    action = jax.random.normal(keys[1], (5, 3)) * 2
    expected = norm.logpdf(action, mean, jnp.exp(log_std)).sum(axis=-1)
    np.testing.assert_allclose(gaussian_log_prob(mean, log_std, action), expected, rtol=1e-5, atol=1e-5)


def test_gaussian_policy_ratio_is_one_before_any_update_and_actions_are_clipped_for_the_env():
    env, params = make_env(ppo_config_for("Pendulum-v1"))
    spec = action_spec(env, params, "Pendulum-v1")
    assert not spec.discrete and spec.shape == (1,) and spec.low.tolist() == [-2.0] and spec.high.tolist() == [2.0]
    dist = ppo._gaussian_policy(spec)
    net = {"log_std": jnp.array([1.5])}  # std e^1.5 ~ 4.5: many samples fall outside [-2, 2]
    mean = jnp.zeros((256, 1))
    action, log_prob = dist.sample(jax.random.key(1), mean, net)
    again, action_dist = dist.log_prob(mean, net, action)
    entropy = dist.entropy(action_dist, net)
    np.testing.assert_array_equal(jnp.exp(again - log_prob), 1.0)  # same params: ratio exactly 1
    assert entropy == pytest.approx(stats.norm(0.0, math.exp(1.5)).entropy(), rel=1e-5)
    to_env = np.asarray(dist.to_env(action))
    assert to_env.shape == (256, 1) and to_env.min() == -2.0 and to_env.max() == 2.0
    assert np.abs(np.asarray(action)).max() > 2.0  # the stored action (whose log-prob it is) stays unclipped


def test_continuous_ppo_learns_pendulum():
    """Gaussian PPO on Pendulum-v1 with its tuned defaults at 32k steps: the first episodes (an all-but-random
    policy) score about -1250; the last ones must be far better (about -350 and -375 on these 2 seeds)."""
    config = ppo_config_for("Pendulum-v1", total_timesteps=16 * 100 * 20)
    assert (config.num_envs, config.num_steps, config.lr, config.gamma) == (16, 100, 1e-2, 0.95)
    assert env_dims(config) == (3, 1)
    train = jax.jit(jax.vmap(make_train(config, ppo_clip_drift()), in_axes=(0, None)))
    metrics = jax.device_get(train(jax.random.split(jax.random.key(0), 2), None))
    for key in ("actor_loss", "value_loss", "entropy", "approx_kl", "episode_returns"):
        assert np.all(np.isfinite(metrics[key])), key
    first = metrics["episode_returns"][:, 1]  # 200-step episodes: the first end during the second update
    assert np.all(first < -900), first
    assert np.all(metrics["final_return"] > first + 500), (first, metrics["final_return"])


# ---------------------------------------------------------------------- any gymnax id


def test_a_gymnax_env_outside_our_table_trains_with_the_generic_defaults():
    config = ppo_config_for(
        "Catch-bsuite", num_envs=4, num_steps=16, total_timesteps=2 * 4 * 16, num_minibatches=2, update_epochs=1
    )
    generic = PPOSettings()
    assert (config.lr, config.activation, config.ent_coef) == (generic.lr, generic.activation, generic.ent_coef)
    assert env_dims(config) == (10 * 5, 3)  # the [10, 5] board flattened; three actions
    metrics = jax.device_get(jax.jit(make_train(config, ppo_clip_drift()))(jax.random.key(0), None))
    assert metrics["episode_returns"].shape == (2,) and np.all(np.isfinite(metrics["total_loss"]))
    assert np.all(metrics["entropy"] > 0.9 * math.log(3))  # a near-uniform categorical policy
    assert np.all(np.abs(metrics["episode_returns"]) <= 1.0)  # Catch pays +1 or -1 per episode


def test_an_unknown_id_names_close_matches_and_where_the_list_lives():
    with pytest.raises(ValueError, match=r"^env_name: unknown env") as err:
        PPOConfig(env_name="Catch-bsuit")
    assert str(err.value).startswith("env_name: unknown env 'Catch-bsuit'; did you mean Catch-bsuite")
    assert "gymnax.registered_envs" in str(err.value) and "\n" not in str(err.value)
    assert env_label("Catch-bsuite") == "Catch-bsuite" and env_label("my_envs:make_env") == "my_envs.make_env"


def test_lpo_and_ta_lpo_drifts_train_a_gaussian_policy_in_one_program():
    """The learned drifts see only (ratio, advantage, progress): a member population vmaps over a Pendulum run."""
    config = ppo_config_for(
        "Pendulum-v1",
        num_envs=4,
        num_steps=50,
        total_timesteps=2 * 4 * 50,
        num_minibatches=2,
        update_epochs=1,
        env_params={"max_steps_in_episode": 50},
    )
    drift_fn, zeros = make_drift("ta_lpo", hidden=8)
    members = jax.tree.map(lambda z: 0.1 * jax.random.normal(jax.random.key(2), (2, *z.shape)), zeros)
    metrics = ppo.train_many(config, drift_fn, jax.random.key(0), members, 1, full_metrics=True)
    assert metrics["final_return"].shape == (2, 1) and np.all(metrics["final_return"] < 0)  # Pendulum pays <= 0
    assert np.all(np.isfinite(metrics["drift"])) and np.all(metrics["episodes_completed"] > 0)


# ---------------------------------------------------------------------- a user env, checked before Ray

BROKEN_ENVS = textwrap.dedent(
    """
    import gymnax
    import jax.numpy as jnp

    def not_a_pair():
        return 3

    def needs_an_argument(size):
        return gymnax.make("CartPole-v1")

    def raises():
        raise RuntimeError("no simulator licence")

    def five_values():
        env, params = gymnax.make("CartPole-v1")

        class OldStep(type(env)):
            def step(self, key, state, action, params=None):
                obs, state, reward, terminated, truncated, info = super().step(key, state, action, params)
                return obs, state, reward, terminated | truncated, info

        return OldStep(), params

    def step_fails():
        env, params = gymnax.make("CartPole-v1")

        class Broken(type(env)):
            def step_env(self, key, state, action, params):
                return jnp.ones(3) @ jnp.ones(4)

        return Broken(), params
    """
)


def experiment(env: str, kind: str = "lpo_eval", **ppo_settings) -> dict:
    entry = {"env": env, "total_timesteps": 8 * 20 * 10, "ppo": {"num_envs": 8, "num_steps": 20, **ppo_settings}}
    section = {"envs": [entry], **({"objectives": ["ppo"], "seeds": 2} if kind == "lpo_eval" else {})}
    return {
        "name": "own_env",
        "kind": kind,
        "ray": {"num_cpus": 2, "cpus_per_trial": 1, "worker_preload": []},
        "tracking": {"uri": "sqlite:///mlflow.db"},
        kind: section,
    }


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """The user's folder: broken_envs.py and the example's reach_target.py, the current directory (imported
    from there, as ``metaopt run`` does); their modules are forgotten afterwards."""
    (tmp_path / "broken_envs.py").write_text(BROKEN_ENVS)
    shutil.copy(OWN_ENV_EXAMPLE / "reach_target.py", tmp_path)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in ("broken_envs", "reach_target"):
        sys.modules.pop(name, None)


def test_env_ids_are_looked_up_in_gymnax_only_where_the_run_happens(monkeypatch):
    """``metaopt submit``/``list`` (check_paths false) accept any well-formed env id, its env_params and every
    horizon without importing gymnax (hence JAX); where the run happens, a gymnax that does not import is one line."""
    for name in [name for name in sys.modules if name.split(".")[0] == "gymnax"] + ["gymnax"]:
        monkeypatch.setitem(sys.modules, name, None)
    raw = experiment("Catch-bsuite", env_params={"max_steps_in_episode": 50})
    raw["lpo_eval"]["horizons"] = [1.0, 2.0]
    loaded = from_dict(raw, check_paths=False)
    assert loaded.section.envs[0].env == "Catch-bsuite"
    with pytest.raises(ConfigError, match=r"^lpo_eval\.envs\.0\.env: 'Catch bsuite' is not a gymnax env id"):
        from_dict(experiment("Catch bsuite"), check_paths=False)
    with pytest.raises(ConfigError) as missing:
        from_dict(experiment("Catch-bsuite"), check_paths=True)
    line = str(missing.value)
    assert line.startswith("lpo_eval.envs.0.env: looking up a gymnax env id needs gymnax and JAX, which did not ")
    assert line.endswith("pip install 'metaopt-platform'") and "\n" not in line


ENV_MODULE = textwrap.dedent(
    """
    import gymnax


    def make_env():
        return gymnax.make("{env}")
    """
)


def test_a_user_envs_compiled_programs_are_keyed_by_its_module_file(tmp_path, monkeypatch):
    """A compiled PPO program is not reused for a user env whose module changed: another folder's module of the
    same name (or the same file edited, as in a notebook) gets a program of its own."""
    from metaopt.objectives.envs import code_fingerprint
    from metaopt.objectives.population import PopulationEvaluator, Problem

    monkeypatch.setattr(sys, "path", list(sys.path))
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, env in ((first, "CartPole-v1"), (second, "Acrobot-v1")):
        folder.mkdir()
        (folder / "notebook_env.py").write_text(ENV_MODULE.format(env=env))
    monkeypatch.setenv("METAOPT_JAX_CACHE", "off")
    reference, evaluator, drift = "notebook_env:make_env", PopulationEvaluator(shard=False), ppo_clip_drift()
    members = {"final_return": jnp.zeros(2)}
    problem = Problem.of(reference, 256)
    try:
        with user_code.from_dir(first):
            first_key, first_print = evaluator._program_key("ppo", (), problem), code_fingerprint(reference)
        with user_code.from_dir(second):
            second_key, second_print = evaluator._program_key("ppo", (), problem), code_fingerprint(reference)
            built = []
            monkeypatch.setattr(ppo, "make_train", lambda config, drift: built.append(1) or (lambda k, p: p))
            config = PPOConfig(env_name=reference, num_envs=4, num_steps=16, total_timesteps=64)
            ppo._population_fn.cache_clear()
            ppo.train_many(config, drift, jax.random.key(0), members, 1, full_metrics=True)
            (second / "notebook_env.py").write_text(ENV_MODULE.format(env="MountainCar-v0") + "\n# edited\n")
            edited_print = code_fingerprint(reference)
            ppo.train_many(config, drift, jax.random.key(0), members, 1, full_metrics=True)
    finally:
        ppo._population_fn.cache_clear()
        sys.modules.pop("notebook_env", None)
    assert first_key[:3] == second_key[:3] and first_key != second_key
    assert len({first_print, second_print, edited_print}) == 3 and str(second) in second_print
    assert len(built) == 2  # the edited module's program was built anew
    assert code_fingerprint("CartPole-v1") == ""  # a gymnax id: its name says it all


@pytest.mark.parametrize(
    ("env", "kind", "field", "problem"),
    [
        ("nowhere:make_env", "lpo_eval", "lpo_eval.envs.0.env", "'nowhere:make_env': no module named 'nowhere'"),
        ("broken_envs:missing", "lpo_eval", "lpo_eval.envs.0.env", "'broken_envs:missing': broken_envs has no"),
        ("broken_envs:needs_an_argument", "lpo_eval", "lpo_eval.envs.0.env", "'broken_envs:needs_an_argument' must"),
        ("broken_envs:raises", "lpo_eval", "lpo_eval.envs.0.env", "'broken_envs:raises' raised RuntimeError: no sim"),
        ("broken_envs:not_a_pair", "lpo", "lpo.envs.0.env", "'broken_envs:not_a_pair' returned a int; expected a pair"),
        ("broken_envs:five_values", "lpo", "lpo.envs.0.env", "'broken_envs:five_values': env.step returned 5 values"),
        ("broken_envs:step_fails", "lpo_eval", "lpo_eval.envs.0.env", "'broken_envs:step_fails': env.step under jax"),
        ("Catch-bsuit", "lpo_eval", "lpo_eval.envs.0.env", "unknown env 'Catch-bsuit'; did you mean Catch-bsuite"),
        ("pickle:/tmp/env.pkl", "lpo", "lpo.envs.0.env", "a pickle: reference is written by metaopt's Python API"),
    ],
)
def test_a_bad_env_is_one_error_line_before_ray(user_folder, capsys, env, kind, field, problem):
    (user_folder / "exp.yaml").write_text(yaml.safe_dump(experiment(env, kind)))
    rc = cli.main(["run", "exp.yaml"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"metaopt: error: {field}: {problem}"), err
    assert not (user_folder / "mlflow.db").exists()


def test_a_user_envs_params_are_checked_against_its_own_env_params(user_folder, capsys):
    exp = experiment("reach_target:make_env", env_params={"gravity": 9.8})
    (user_folder / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert cli.main(["run", "exp.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaopt: error: lpo_eval.envs.0.ppo.env_params: 'gravity' is not a field of"), err
    assert "max_steps_in_episode" in err


def test_metaopt_run_evaluates_ppo_on_the_users_env_from_their_folder(tmp_path):
    """As a user runs it: the example's env module copied to a folder outside the package, an lpo_eval file beside
    it, ``metaopt run`` from there. ReachTarget pays 1 - |a - t| for 10 steps: a mean return in (0, 10) is its
    (Pendulum's are negative, a random CartPole policy's about 20); the table names the factory."""
    shutil.copy(OWN_ENV_EXAMPLE / "reach_target.py", tmp_path)
    exp = experiment("reach_target:make_env", lr=0.01, ent_coef=0.0, num_minibatches=4)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    result = run_metaopt_from(tmp_path, "exp.yaml", "--quiet")
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("ppo ")]
    assert len(rows) == 1 and rows[0][1] == "reach_target.make_env_1600", result.stdout
    assert 0.0 < float(rows[0][2]) < 10.0, rows
