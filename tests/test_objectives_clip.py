"""The learned drifts' inner PPO clip is the meta-training problems' (Lu et al. 2022, Sec. 4: with the network at
zero LPO *is* PPO, so ES starts at the PPO baseline): the section's drift options carry the envs' ``clip_eps``, the
export records it, ``lpo_eval`` trains an exported drift with it and its built-in ``ppo`` with the env's clip;
and ``time_inputs: fraction_and_log_horizon`` needs more than one run budget N (else log N is a constant)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import EXPERIMENTS
from metaopt import config
from metaopt.objectives import drifts, evaluate
from metaopt.objectives.export import save_drift
from metaopt.objectives.meta_train import baseline_options, initial_mean
from metaopt.objectives.population import Problem

ENV = "{env: CartPole-v1, total_timesteps: 1024, ppo: {num_envs: 4, num_steps: 64, clip_eps: 0.1}}"


class Recorder:
    """An evaluator that trains nothing: it records what it was asked to run."""

    def __init__(self):
        self.calls = []

    def returns(self, drift, options, problem, params, keys):
        self.calls.append((drift, options, problem))
        return np.ones((1, len(keys)))


def load(tmp_path, *overrides: str):
    base = [f"ray.storage_path={tmp_path / 'ray_results'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    return config.load(EXPERIMENTS / "lpo_tiny.yaml", [*base, *overrides])


@pytest.mark.parametrize("drift", ["lpo", "ta_lpo"])
def test_zero_network_drift_is_the_ppo_baselines_drift_at_the_envs_clip(tmp_path, drift):
    """Env clip 0.1: the ES start (zero output layer) gives relu(D_ppo(0.1) - 1e-4) on a grid of (r, A), D_ppo the
    baseline's drift; e.g. r = 1.15, A = 1: baseline 0.05, the learned drift 0.05 - 1e-4 (0.0 with a fixed 0.2)."""
    exp = load(tmp_path, f"lpo.drift={drift}", f"lpo.envs=[{ENV}]")
    options = dict(exp.section.drift_options())  # MetaTrainer.drift_options: what ES trains and exports
    problem = Problem.of(**exp.section.envs[0].model_dump())  # MetaTrainer.problems: the baseline's problem
    assert options["clip_eps"] == dict(baseline_options(problem))["clip_eps"] == 0.1
    learned, zeros = drifts.make_drift(drift, **options)
    baseline, _ = drifts.make_drift("ppo", **dict(baseline_options(problem)))
    ratio, advantage = jnp.meshgrid(jnp.linspace(0.5, 1.5, 41), jnp.linspace(-3.0, 3.0, 13))
    progress = drifts.Progress(jnp.float32(0.3), jnp.float32(np.log(1024)))
    expected = jax.nn.relu(baseline({}, ratio, advantage) - drifts.LPO_OFFSET)
    for params in (zeros, initial_mean(zeros, jax.random.PRNGKey(0))):
        np.testing.assert_array_equal(learned(params, ratio, advantage, progress), expected)
    assert float(baseline({}, 1.15, 1.0)) == pytest.approx(0.05)
    assert float(learned(zeros, 1.15, 1.0, progress)) == pytest.approx(0.05 - drifts.LPO_OFFSET)
    assert float(drifts.ppo_drift({}, 1.15, 1.0, clip_eps=0.1)) == pytest.approx(0.05)


def test_export_records_the_clip_and_lpo_eval_trains_with_it(tmp_path, monkeypatch):
    """The exported drift carries clip_eps 0.1; lpo_eval trains it with 0.1 on an env of clip 0.2, and trains
    its built-in ppo with each env's own clip (evaluation_trial, the PPO runs stubbed)."""
    from ray import tune

    from metaopt.objectives import population

    exp = load(tmp_path, "lpo.drift=ta_lpo", f"lpo.envs=[{ENV}]")
    options = dict(exp.section.drift_options())
    _, zeros = drifts.make_drift("ta_lpo", **options)
    directory = save_drift(tmp_path / "drift", "ta_lpo", zeros, options)
    learned = evaluate.resolve_objective(str(directory), "unused")
    assert learned.options["clip_eps"] == 0.1
    assert dict(evaluate.trial_options(learned, 0.2))["clip_eps"] == 0.1
    ppo = evaluate.resolve_objective("ppo", "unused")
    assert evaluate.trial_options(ppo, 0.1) == (("clip_eps", 0.1),)
    assert evaluate.trial_options(evaluate.resolve_objective("dpo", "unused"), 0.1) == ()

    recorder = Recorder()
    monkeypatch.setattr(population.PopulationEvaluator, "returns", lambda self, *a: recorder.returns(*a))
    monkeypatch.setattr(tune, "report", lambda metrics: None)
    for objective, clip in ((ppo, 0.1), (ppo, 0.3), (learned, 0.3)):
        problem = {"env": "CartPole-v1", "total_timesteps": 1024, "ppo": {"clip_eps": clip}}
        evaluate.evaluation_trial(
            {"objective": objective.__dict__, "problem": problem, "seed": 0, "seeds": 2, "confidence": 0.9}
        )
    assert [dict(options)["clip_eps"] for _, options, _ in recorder.calls] == [0.1, 0.3, 0.1]


def test_envs_with_different_clips_are_refused_in_one_line(tmp_path):
    other = "{env: Acrobot-v1, total_timesteps: 2048, ppo: {num_envs: 4, num_steps: 64}}"
    with pytest.raises(
        ValueError, match=r"lpo\.envs: every env needs the same ppo\.clip_eps .*envs\.0: 0\.1, envs\.1: 0\.2$"
    ):
        load(tmp_path, f"lpo.envs=[{ENV}, {other}]")
    with pytest.raises(ValueError, match=r"clip must be < 1 \(got 1\)"):
        load(tmp_path, "lpo.envs=[{env: CartPole-v1, total_timesteps: 1024, ppo: {clip_eps: 1.0}}]")


def test_log_horizon_inputs_need_several_budgets(tmp_path):
    """log N is constant with one horizon and one env budget: refused; several horizons or budgets: accepted."""
    ta = ["lpo.drift=ta_lpo", "lpo.time_inputs=fraction_and_log_horizon"]
    with pytest.raises(
        ValueError, match=r"lpo\.time_inputs: fraction_and_log_horizon needs several horizons or env budgets"
    ):
        load(tmp_path, *ta, f"lpo.envs=[{ENV}]")
    same = "{env: Acrobot-v1, total_timesteps: 1024, ppo: {num_envs: 4, num_steps: 64, clip_eps: 0.1}}"
    with pytest.raises(ValueError, match=r"N = 1024 env steps"):
        load(tmp_path, *ta, f"lpo.envs=[{ENV}, {same}]")
    assert load(tmp_path, *ta, f"lpo.envs=[{ENV}]", "lpo.horizons=[0.5, 1.0]").section.horizons == [0.5, 1.0]
    assert len(load(tmp_path, *ta).section.envs) == 2  # lpo_tiny: CartPole 1024 and Acrobot 2048 steps
