"""ES meta-training of learned objectives and their evaluation, on real Ray Tune and real MLflow.

The reference is the ES run done directly in this process (no Ray): the Tune run, the Tune run whose trial
process is killed mid-run, and the run whose population is split over Ray actors must all reach the same
ES state, bit for bit (or, across actor batch shapes, to float tolerance).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from mlflow.tracking import MlflowClient

from conftest import EXPERIMENTS, KillTrialProcess, assert_runs_finished
from metaopt import config, tracking
from metaopt.objectives import drifts, export
from metaopt.objectives.meta_train import MetaTrainer, baseline_options, initial_mean, normalised
from metaopt.objectives.population import RayPopulation

GENERATIONS = 3


def load_tiny(tmp_path: Path, *overrides: str):
    base = [f"ray.storage_path={tmp_path / 'ray_results'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    return config.load(EXPERIMENTS / "lpo_tiny.yaml", [*base, *overrides])


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory):
    """Three generations in this process; per generation the fitness vector; the final ES state."""
    exp = load_tiny(tmp_path_factory.mktemp("direct"))
    trainer = MetaTrainer(exp.section, meta_seed=0)
    state = trainer.init_state()
    start_mean = np.asarray(state.mean)
    fitness = []
    for generation in range(GENERATIONS):
        state, result = trainer.generation(state, generation)
        fitness.append(result.fitness)
    return {"exp": exp, "trainer": trainer, "state": state, "fitness": fitness, "start_mean": start_mean}


def final_mean(params: dict) -> np.ndarray:
    return np.concatenate([np.asarray(params["hidden"]).ravel(), np.asarray(params["out"]).ravel()])


def test_es_starts_exactly_at_ppo_but_off_the_symmetric_point():
    """Zero output layer: drift == relu(ppo - 1e-4) everywhere; random hidden layer: antithetic pairs differ."""
    drift_fn, zeros = drifts.make_drift("lpo", hidden=16)
    params = initial_mean(zeros, jax.random.PRNGKey(0))
    ratio = jnp.exp(jax.random.normal(jax.random.PRNGKey(1), (256,)) * 0.5)
    advantage = jax.random.normal(jax.random.PRNGKey(2), (256,)) * 2
    expected = jax.nn.relu(drifts.ppo_drift({}, ratio, advantage) - drifts.LPO_OFFSET)
    np.testing.assert_array_equal(drift_fn(params, ratio, advantage), expected)
    # a member and its antithetic mirror are different drifts (at mean 0 they would be the same function)
    z = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(3), x.shape), params)
    plus = jax.tree.map(lambda m, d: m + 0.5 * d, params, z)
    minus = jax.tree.map(lambda m, d: m - 0.5 * d, params, z)
    assert not np.allclose(drift_fn(plus, ratio, advantage), drift_fn(minus, ratio, advantage))
    at_zero_plus = jax.tree.map(lambda d: 0.5 * d, z)
    at_zero_minus = jax.tree.map(lambda d: -0.5 * d, z)
    np.testing.assert_array_equal(drift_fn(at_zero_plus, ratio, advantage), drift_fn(at_zero_minus, ratio, advantage))


def test_direct_es_moves_the_mean_and_members_differ(direct_run):
    state = direct_run["state"]
    assert int(state.generation_counter) == GENERATIONS
    assert not np.array_equal(np.asarray(state.mean), direct_run["start_mean"])
    assert all(f.shape == (4,) and np.all(np.isfinite(f)) and np.all(f > 0) for f in direct_run["fitness"])
    assert any(len(set(np.round(f, 6))) > 1 for f in direct_run["fitness"]), "every member scored the same"
    assert set(direct_run["trainer"].baselines) == {"CartPole-v1_1024", "Acrobot-v1_2048"}


def test_scores_are_normalised_by_ppo_for_either_sign_of_return():
    assert normalised(np.array([150.0, 300.0]), 300.0) == pytest.approx([0.5, 1.0])  # R / R_ppo
    assert normalised(np.array([-500.0, -100.0, -50.0]), -100.0) == pytest.approx([-3.0, 1.0, 1.5])


def test_ta_lpo_draws_its_horizons_per_generation_and_trains(tmp_path):
    """TA-LPO needs several horizons: each generation draws one per env, reproducibly from the seed."""
    exp = load_tiny(
        tmp_path,
        "lpo.drift=ta_lpo",
        "lpo.horizons=[0.5, 1.0]",
        "lpo.envs=[{env: CartPole-v1, total_timesteps: 1024,"
        " ppo: {num_envs: 4, num_steps: 64, update_epochs: 1, num_minibatches: 2}}]",
    )
    trainer = MetaTrainer(exp.section, meta_seed=0)
    drawn = [trainer.draw_problem(jax.random.fold_in(trainer.root, g), 0)[0].total_timesteps for g in range(24)]
    assert set(drawn) == {512, 1024}
    assert drawn == [
        MetaTrainer(exp.section, 0).draw_problem(jax.random.fold_in(trainer.root, g), 0)[0].total_timesteps
        for g in range(24)
    ]
    state = trainer.init_state()
    assert state.mean.size == 16 * 16 + 16  # time enters as n/N * x for each of the 8 inputs (eq. 10)
    for generation in range(2):
        state, result = trainer.generation(state, generation)
        assert np.all(np.isfinite(result.fitness))
    assert set(trainer.baselines) <= {"CartPole-v1_512", "CartPole-v1_1024"}


def test_a_baseline_without_finished_episodes_is_a_clear_error(tmp_path):
    exp = load_tiny(tmp_path, "lpo.envs=[{env: Acrobot-v1, total_timesteps: 256, ppo: {num_envs: 4, num_steps: 64}}]")
    with pytest.raises(ValueError, match="no episode finished"):
        MetaTrainer(exp.section, meta_seed=0).baseline(MetaTrainer(exp.section, 0).problems(0)[0])


def test_population_sharded_over_devices_matches_one_device(tmp_path):
    """With several JAX devices (GPUs; here 2 forced host devices) members are sharded; same returns."""
    import subprocess
    import sys

    script = (
        "import jax, numpy as np\n"
        "from metaopt.objectives.population import PopulationEvaluator, Problem, seed_keys\n"
        "from metaopt.objectives.drifts import make_drift\n"
        "from metaopt.objectives.meta_train import initial_mean\n"
        "assert len(jax.devices()) == 2, jax.devices()\n"
        "_, zeros = make_drift('lpo', hidden=8)\n"
        "mean = initial_mean(zeros, jax.random.PRNGKey(0))\n"
        "batch = jax.tree.map(lambda m: m + 0.5 * jax.random.normal(jax.random.PRNGKey(1), (4, *m.shape)), mean)\n"
        "problem = Problem.of('CartPole-v1', 512, {'num_envs': 4, 'num_steps': 64, 'update_epochs': 1})\n"
        "keys = seed_keys(jax.random.PRNGKey(2), 2)\n"
        "a = PopulationEvaluator(shard=True).returns('lpo', (('hidden', 8),), problem, batch, keys)\n"
        "b = PopulationEvaluator(shard=False).returns('lpo', (('hidden', 8),), problem, batch, keys)\n"
        "np.testing.assert_allclose(a, b, rtol=1e-5)\n"
        "print('OK', a.shape)\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK (4, 2)" in done.stdout, done.stderr[-3000:]


def test_restored_es_state_continues_bit_identically(direct_run):
    exp = direct_run["exp"]
    trainer = MetaTrainer(exp.section, meta_seed=0)
    state = trainer.init_state()
    state, _ = trainer.generation(state, 0)
    blob = serialization.to_bytes(state)
    fresh = MetaTrainer(exp.section, meta_seed=0)
    fresh.baselines = dict(trainer.baselines)
    state = serialization.from_bytes(fresh.init_state(), blob)
    fitness = []
    for generation in range(1, GENERATIONS):
        state, result = fresh.generation(state, generation)
        fitness.append(result.fitness)
    np.testing.assert_array_equal(np.asarray(state.mean), np.asarray(direct_run["state"].mean))
    for got, want in zip(fitness, direct_run["fitness"][1:]):
        np.testing.assert_array_equal(got, want)


def test_population_split_over_ray_actors_matches_in_process(ray_session, direct_run):
    exp = direct_run["exp"]
    workers = RayPopulation(2, cpus=0.5)
    try:
        trainer = MetaTrainer(exp.section, meta_seed=0, evaluator=workers)
        _state, result = trainer.generation(trainer.init_state(), 0)
    finally:
        workers.close()
    np.testing.assert_allclose(result.fitness, direct_run["fitness"][0], rtol=1e-5)


def test_killed_meta_training_trial_resumes_bit_identically(ray_session, tmp_path, direct_run):
    from metaopt.objectives.sweep import run_meta_training

    exp = load_tiny(tmp_path, "lpo.checkpoint_every=1", "lpo.max_failures=2")
    killer = KillTrialProcess(at_iteration=2)
    summary = run_meta_training(exp, callbacks=[killer], verbose=0)
    assert killer.killed, "the test did not kill anything"
    (trial,) = summary.trials
    assert trial.error is None and trial.generations == GENERATIONS
    # generations 1, 2 reported, the process killed as 2 was reported; the trial resumed from the last
    # checkpoint on disk (1 or 2) and went on to 3: nothing lost, and a redone generation scores the same
    generations, fitness = trial.curves["fitness_mean"]
    assert generations[:2] == [1, 2] and generations[-1] == GENERATIONS and set(generations) == {1, 2, 3}
    assert generations == sorted(generations) and len(generations) <= 4
    reference = {g + 1: float(np.mean(f)) for g, f in enumerate(direct_run["fitness"])}
    for generation, value in zip(generations, fitness):
        assert value == pytest.approx(reference[generation], rel=1e-6), generation
    _, params = export.load_drift(trial.drift_dir)
    want = direct_run["trainer"].mean_params(direct_run["state"])
    np.testing.assert_array_equal(final_mean(params), final_mean(want))
    assert_runs_finished(exp.tracking.uri, exp.mlflow_experiment, at_least=2)


def test_meta_training_tracks_to_mlflow_and_evaluation_reads_it_back(ray_session, tmp_path, direct_run):
    """lpo run (population split over 2 Ray workers in the trial's placement group) -> MLflow -> lpo_eval."""
    from metaopt.objectives import evaluate
    from metaopt.objectives.sweep import DRIFT_ARTIFACT, run_meta_training

    exp = load_tiny(tmp_path, "lpo.workers=2", "lpo.cpus_per_worker=0.5", "ray.cpus_per_trial=0.5")
    summary = run_meta_training(exp, verbose=0)
    (trial,) = summary.trials
    assert trial.error is None and summary.best_trial == trial.trial_id
    assert math.isfinite(trial.mean_score) and trial.mean_score > 0
    assert math.isfinite(trial.start_mean_score)  # generation 0 (PPO's objective) on the same evaluation seeds
    _, params = export.load_drift(trial.drift_dir)
    want = direct_run["trainer"].mean_params(direct_run["state"])
    np.testing.assert_allclose(final_mean(params), final_mean(want), rtol=1e-4, atol=1e-6)

    client = MlflowClient(exp.tracking.uri)
    parent = client.get_run(summary.parent_run_id)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {DRIFT_ARTIFACT, "drift_heatmaps.png", "meta_training.png"} <= artifacts
    assert parent.data.metrics["best_mean_score"] == pytest.approx(trial.mean_score)
    (child,) = tracking.child_runs(client, parent.info.experiment_id, parent.info.run_id)
    history = client.get_metric_history(child.info.run_id, "fitness_mean")
    assert [m.step for m in history] == [1, 2, 3]
    assert "drift" in {a.path for a in client.list_artifacts(child.info.run_id)}
    # the exported drift, downloaded back from MLflow, runs in torch and agrees with JAX
    torch_drift = export.load_torch_drift(client.download_artifacts(parent.info.run_id, DRIFT_ARTIFACT, str(tmp_path)))
    drift_fn, jax_params = export.load_drift(trial.drift_dir)
    ratio = np.exp(np.random.default_rng(0).normal(0, 0.3, 64)).astype(np.float32)
    advantage = np.random.default_rng(1).normal(0, 1, 64).astype(np.float32)
    import torch

    np.testing.assert_allclose(
        torch_drift(torch.from_numpy(ratio), torch.from_numpy(advantage)).numpy(),
        np.asarray(drift_fn(jax_params, ratio, advantage)),
        atol=1e-5,
    )

    # evaluation: the discovered drift (from MLflow) vs PPO and DPO, 2 seeds, on the same tracking store
    eval_exp = config.from_dict(
        {
            "name": "lpo_tiny_eval",
            "kind": "lpo_eval",
            "ray": {"num_cpus": 2, "cpus_per_trial": 1, "storage_path": str(tmp_path / "ray_results")},
            "tracking": {"uri": exp.tracking.uri},
            "lpo_eval": {
                "objectives": ["ppo", "dpo", f"mlflow:{summary.parent_run_id}"],
                "envs": [exp.section.envs[0].model_dump()],
                "seeds": 2,
                "heatmap_progress": [0.0, 1.0],
            },
        }
    )
    table = evaluate.run(eval_exp, verbose=0)
    assert {row["objective"] for row in table} == {"ppo", "dpo", f"mlflow:{summary.parent_run_id}"}
    for row in table:
        assert row["error"] is None and len(row["returns"]) == 2
        assert row["ci_low"] <= row["mean"] <= row["ci_high"] and row["mean"] > 5
    ppo_row = next(r for r in table if r["objective"] == "ppo")
    assert ppo_row["mean"] == pytest.approx(np.mean(ppo_row["returns"]))
    eval_run = client.search_runs(
        [client.get_experiment_by_name("lpo_tiny_eval").experiment_id], "tags.`metaopt.role` = 'sweep'"
    )[0]
    assert {"evaluation.csv", "evaluation.json", "evaluation.png", "drift_heatmaps.png"} <= {
        a.path for a in client.list_artifacts(eval_run.info.run_id)
    }
    assert eval_run.data.metrics["ppo.CartPole-v1_1024.mean"] == pytest.approx(ppo_row["mean"])
    logged = json.loads(
        Path(client.download_artifacts(eval_run.info.run_id, "evaluation.json", str(tmp_path))).read_text()
    )
    assert len(logged) == 3


def test_ppo_baseline_uses_the_envs_clip_and_ta_lpo_options_reach_the_drift(tmp_path):
    """The fitness normaliser (PPO's return) runs PPO with the env's clip_eps, not a fixed 0.2; the section's
    time_inputs is the drift's (and the exported drift's) option. A stub evaluator records the calls."""
    from metaopt.objectives.population import Problem

    class Recorder:
        def __init__(self):
            self.calls = []

        def returns(self, drift, options, problem, params, keys):
            self.calls.append((drift, options, problem))
            return np.ones((1, len(keys)))

    exp = load_tiny(
        tmp_path,
        "lpo.drift=ta_lpo",
        "lpo.time_inputs=fraction_and_log_horizon",
        "lpo.horizons=[1.0, 2.0]",
        "lpo.envs=[{env: CartPole-v1, total_timesteps: 1024, ppo: {clip_eps: 0.1}}]",
    )
    recorder = Recorder()
    trainer = MetaTrainer(exp.section, meta_seed=0, evaluator=recorder)
    assert trainer.baseline(trainer.problems(0)[0]) == 1.0
    assert recorder.calls[0][:2] == ("ppo", (("clip_eps", 0.1),))
    assert dict(trainer.drift_options) == {"clip_eps": 0.1, "hidden": 16, "time_inputs": "fraction_and_log_horizon"}
    assert trainer.initial_params["hidden"].shape[0] == 24
    default = Problem.of("CartPole-v1", 1024)
    assert dict(baseline_options(default)) == {"clip_eps": 0.2}
    with pytest.raises(ValueError, match=r"time_inputs: only ta_lpo sees time"):
        load_tiny(tmp_path, "lpo.time_inputs=fraction_and_log_horizon")
