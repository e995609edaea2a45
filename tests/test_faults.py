"""A trial SIGKILLed mid-sweep ends exactly as if it never was: the same metrics, learning rates and weights as an
uninterrupted run with the same seed, and every MLflow run FINISHED. (Federated and post-training sweeps' kill
tests are in test_federated_tune.py and test_posttrain.py; these are PBT's and the pieces they stand on.)"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import EXPERIMENTS, KillTrialProcess, assert_runs_finished
from metaopt import config
from metaopt.pbt import sweep
from metaopt.tuning import load_state, save_state


def final_weights(summary: sweep.SweepSummary) -> dict[str, float]:
    """Per trial tag: the sum of its final model's weights, read from its last checkpoint."""
    out = {}
    for trial in summary.trials:
        trial_dir = next(p for p in Path(summary.experiment_path).iterdir() if p.is_dir() and trial.trial_id in p.name)
        last = sorted(trial_dir.glob("checkpoint_*"))[-1]
        model = load_state(str(last), "trainable_state.pt")["task"]["model"]
        out[trial.tag] = float(sum(t.double().sum() for t in model.values()))
    return out


def by_tag(summary: sweep.SweepSummary) -> dict[str, sweep.TrialSummary]:
    return {t.tag: t for t in summary.trials}


def exploited(trial) -> bool:
    """Tune tags a trial ``...@perturbed[...]`` once PBT has made it exploit a peer."""
    return "@perturbed" in trial.experiment_tag


def test_trial_killed_after_a_synchronous_pbt_exploit_ends_as_the_uninterrupted_sweep(ray_session, tmp_path):
    def load(name: str):
        return config.load(
            EXPERIMENTS / "quickstart_tiny.yaml",
            [
                f"ray.storage_path={tmp_path / name}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "pbt.iterations=4",
                "pbt.max_failures=2",
            ],
        )

    # Synchronous PBT decides at barriers, from scores and its seeded draws, never from timing.
    random.seed(20)  # the driver's global generator differs between the two runs: PBT must not depend on it
    exp = load("reference")
    reference = sweep.run(exp, verbose=0)
    # The exploiting trial dies as it reports the first iteration after the exploit: it restarts from the
    # donor's boundary checkpoint (its latest), with its perturbed lr.
    killer = KillTrialProcess(at_iteration=3, when=exploited)
    random.seed(21)
    killed = sweep.run(load("killed"), callbacks=[killer], verbose=0)

    assert killer.killed, "no exploiting trial was killed: the test proves nothing"
    (victim_id,) = killer.killed
    victim = next(t for t in killed.trials if t.trial_id == victim_id)
    per_iteration = exp.section.steps_per_iteration
    assert [s // per_iteration for s, _ in victim.reported] == [1, 2, 3, 3, 4]  # iteration 3 redone
    want, got = by_tag(reference), by_tag(killed)
    assert set(want) == set(got) and len(got) == 2
    for tag, trial in got.items():
        assert trial.steps == want[tag].steps and trial.lineage_agrees
        assert trial.final_metric == pytest.approx(want[tag].final_metric, abs=1e-9), tag
        assert trial.final_lr == pytest.approx(want[tag].final_lr, rel=1e-12), tag
        assert [lr for _, lr in trial.schedule] == pytest.approx([lr for _, lr in want[tag].schedule], rel=1e-12)
    weights = final_weights(killed)
    assert weights == pytest.approx(final_weights(reference), rel=1e-9, abs=1e-9)
    assert_runs_finished(f"sqlite:///{tmp_path / 'mlflow.db'}", "quickstart-tiny", at_least=2 * 3)


def test_trial_killed_under_asynchronous_pbt_loses_no_iteration_and_keeps_its_lineage(ray_session, tiny):
    exp = tiny("pbt.synch=false", "pbt.iterations=6", "pbt.checkpoint_interval=1", "pbt.max_failures=2")
    killer = KillTrialProcess(at_iteration=3)
    summary = sweep.run(exp, callbacks=[killer], verbose=0)

    assert killer.killed, "the test did not kill anything"
    (victim_id,) = killer.killed
    victim = next(t for t in summary.trials if t.trial_id == victim_id)
    per_iteration = exp.section.steps_per_iteration
    iterations = [s // per_iteration for s, _ in victim.reported]
    # resumed from its last checkpoint (iteration 2 or 3): every iteration trained, none skipped
    assert iterations[-1] == 6 and set(iterations) == set(range(1, 7)), iterations
    assert all(b - a <= 1 for a, b in itertools.pairwise(iterations)), iterations
    for trial in summary.trials:
        assert trial.steps == exp.section.iterations * per_iteration and not trial.diverged
        assert trial.lineage_agrees, (trial.trial_id, trial.schedule, trial.carried_schedule)
    assert_runs_finished(exp.tracking.uri, exp.mlflow_experiment, at_least=3)


def test_a_resumed_post_training_run_trains_on_the_rollout_that_was_in_flight(tmp_path):
    """With ``roles.overlap`` the checkpoint after step t must hold step t+1's rollout (sampled with the weights
    before update t): resuming without it draws other prompts with other weights, and the run diverges."""
    from metaopt.posttrain.loop import GRPORun
    from metaopt.posttrain.roles import start_roles, unpack_weights

    # A warm-up long enough that some completions are right: rewards differ, so updates and prompts matter.
    section = config.load(
        EXPERIMENTS / "grpo_tiny.yaml",
        [
            "posttrain.roles.mode=colocated",
            "posttrain.roles.overlap=true",
            "posttrain.warmup.steps=40",
            "posttrain.warmup.lr=0.01",
            "posttrain.tasks=[{name: arithmetic, levels: [1]}]",
        ],
    ).section

    def weights(run):
        return unpack_weights(run.roles.get(run.roles.call(run.roles.learner, "weights")))

    straight = GRPORun(section, "sec", 0, start_roles(section, 0))
    want = [straight.step() for _ in range(4)]
    first = GRPORun(section, "sec", 0, start_roles(section, 0))
    got = [first.step() for _ in range(2)]
    save_state(first.state_dict(), str(tmp_path))
    resumed = GRPORun(section, "sec", 0, start_roles(section, 0))  # a new process: fresh roles
    resumed.load_state_dict(load_state(str(tmp_path)))
    got += [resumed.step() for _ in range(2)]
    assert any(m["reward"] > 0 for m in want[2:]), "no reward after the resume: the comparison is empty"
    for a, b in zip(want, got):
        assert (a["reward"], a["completion_tokens"]) == (b["reward"], b["completion_tokens"])
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6, abs_tol=1e-9)
        assert {k: v for k, v in a.items() if k.startswith("p/")} == {k: v for k, v in b.items() if k.startswith("p/")}
    for name, tensor in weights(straight).items():
        torch.testing.assert_close(tensor, weights(resumed)[name], rtol=0, atol=0)
