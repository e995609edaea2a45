"""GRPO post-training as Tune trials with rollout / learner / reference roles: colocated and Ray-actor runs agree,
the curriculum and metrics are tracked in MLflow with sample completions, a killed trial resumes from its last
checkpoint, PBT adapts the learner's lr, and bad input is one error line with exit code 2."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import EXPERIMENTS, KillTrialProcess, assert_runs_finished
from metaopt import cli, config, tracking


def load_tiny(tmp_path, *overrides: str):
    base = [f"ray.storage_path={tmp_path / 'ray_results'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    return config.load(EXPERIMENTS / "grpo_tiny.yaml", [*base, *overrides])


def run_steps(section, roles, steps: int) -> tuple[list[dict], dict]:
    from metaopt.posttrain.loop import GRPORun

    run = GRPORun(section, "sec", 0, roles)
    metrics = [run.step() for _ in range(steps)]
    from metaopt.posttrain.roles import unpack_weights

    return metrics, unpack_weights(roles.get(roles.call(roles.learner, "weights")))


def with_roles_mode(section, mode: str, overlap: bool):
    return section.model_copy(update={"roles": section.roles.model_copy(update={"mode": mode, "overlap": overlap})})


def test_colocated_and_actor_roles_train_the_same_policy_and_overlap_still_trains(ray_session, tmp_path):
    """Without overlap, the same seeds give the same prompts, samples, updates and weights whether the roles are
    objects in this process or Ray actors (weights travel through the object store). With overlap, sampling runs
    one update behind the learner and training goes on."""
    from metaopt.posttrain.roles import start_roles

    section = load_tiny(tmp_path).section
    colocated = with_roles_mode(section, "colocated", overlap=False)
    local_metrics, local_weights = run_steps(colocated, start_roles(colocated, 0), 3)
    actors = with_roles_mode(section, "actors", overlap=False)
    roles = start_roles(actors, 0)
    try:
        places = roles.get([roles.call(w, "placement") for w in [*roles.rollout, roles.learner]])
        assert [p["device"] for p in places] == ["cpu", "cpu"]  # gpus_per_* = 0: Ray hides every GPU
        actor_metrics, actor_weights = run_steps(actors, roles, 3)
        for a, b in zip(local_metrics, actor_metrics):
            assert a["reward"] == b["reward"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-7)
        for name, tensor in local_weights.items():
            torch.testing.assert_close(tensor, actor_weights[name], rtol=1e-5, atol=1e-6)
        overlapped, _ = run_steps(with_roles_mode(section, "actors", overlap=True), roles, 3)
    finally:
        roles.close()
    assert all(math.isfinite(m["loss"]) and 0 <= m["reward"] <= 1 for m in overlapped)
    assert all(m["completions_per_s"] > 0 for m in overlapped)


def test_posttrain_sweep_tracks_curriculum_accuracy_and_samples(ray_session, tmp_path):
    from metaopt.posttrain.sweep import run

    # in-process roles: what is tracked does not depend on where the roles run (actors are tested above and below)
    exp = load_tiny(tmp_path, "posttrain.curricula=[sec, uniform]", "posttrain.roles.mode=colocated")
    rows = run(exp, verbose=0)
    assert sorted(r["curriculum"] for r in rows) == ["sec", "uniform"]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["curves"]["grpo_step"] == [2, 4]
        assert 0 <= r["final_accuracy"] <= 1 and 0 <= r["warmup_accuracy"] <= 1
        probs = [r["curves"][k][-1] for k in r["curves"] if k.startswith("p/")]
        assert len(probs) == 2 and math.isclose(sum(probs), 1.0, rel_tol=1e-6)
    uniform = next(r for r in rows if r["curriculum"] == "uniform")
    assert uniform["curves"]["p/arithmetic/L1"] == [0.5, 0.5]
    client = MlflowClient(exp.tracking.uri)
    experiment = client.get_experiment_by_name("grpo_tiny")
    parent = client.search_runs([experiment.experiment_id], "tags.`metaopt.role` = 'sweep'")[0]
    assert {"accuracy.png", "curriculum.png", "summary.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = tracking.child_runs(client, experiment.experiment_id, parent.info.run_id)
    assert len(children) == 2
    child = children[0].info.run_id
    assert [m.step for m in client.get_metric_history(child, "kl")] == [1, 2]
    assert {"reward", "accuracy", "completions_per_s", "p.arithmetic.L1"} <= set(children[0].data.metrics)
    samples = [a.path for a in client.list_artifacts(child, "samples_text")]
    assert samples == ["samples_text/iter_0001.txt", "samples_text/iter_0002.txt"]
    text = client.download_artifacts(child, samples[0], str(tmp_path))
    with open(text) as handle:
        assert "prompt | completion | answer | reward" in handle.read()


def final_policy_sum(storage: Path) -> float:
    """The sum of the learner's weights in the (only) trial's last checkpoint."""
    from metaopt.tuning import load_state

    last = sorted(storage.glob("*/PostTrainTrainable*/checkpoint_*"))[-1]
    return float(sum(t.double().sum() for t in load_state(str(last))["learner"]["policy"].values()))


def test_killed_posttrain_trial_in_actor_mode_ends_as_the_uninterrupted_run(ray_session, tmp_path):
    """Rollout, learner and reference as Ray actors with overlap (sampling one update behind): the process of the
    trial is killed mid-run, its actors die with it, and the resumed trial trains on exactly what the
    uninterrupted one does (the checkpoint holds the rollout in flight), to the same weights."""
    from metaopt.posttrain.sweep import run

    def load(name: str):
        # a warm-up long enough that some completions are right: rewards differ, so every update matters
        return load_tiny(
            tmp_path,
            "posttrain.steps=6",
            "posttrain.roles.mode=actors",
            "posttrain.roles.overlap=true",
            "posttrain.warmup.steps=40",
            "posttrain.warmup.lr=0.01",
            "posttrain.samples_to_log=0",
            "posttrain.tasks=[{name: arithmetic, levels: [1]}]",
            f"ray.storage_path={tmp_path / name}",
        )

    (want,) = run(load("reference"), verbose=0)
    killer = KillTrialProcess(at_iteration=2)
    exp = load("killed")
    (row,) = run(exp, callbacks=[killer], verbose=0)
    assert killer.killed, "the test did not kill anything"
    assert row["error"] is None and want["error"] is None
    steps = row["curves"]["grpo_step"]
    assert steps[:2] == [2, 4] and steps[-1] == 6 and set(steps) == {2, 4, 6} and steps == sorted(steps)
    assert any(r > 0 for r in want["curves"]["reward"]), "no reward at all: the comparison is empty"
    reference = {key: dict(zip(want["curves"]["grpo_step"], values)) for key, values in want["curves"].items()}
    compared = ["reward", "kl", "accuracy", "lr", *(k for k in want["curves"] if k.startswith("p/"))]
    for key in compared:
        got = [(step, value) for step, value in zip(steps, row["curves"][key]) if not math.isnan(value)]
        want_values = [reference[key][step] for step, _ in got]
        assert got and [v for _, v in got] == pytest.approx(want_values, rel=1e-5, abs=1e-7), (key, got, want_values)
    assert row["final_accuracy"] == want["final_accuracy"]
    assert final_policy_sum(tmp_path / "killed") == pytest.approx(final_policy_sum(tmp_path / "reference"), rel=1e-6)
    assert_runs_finished(exp.tracking.uri, "grpo_tiny", at_least=2 * 2)


def test_pbt_adapts_the_learner_lr(ray_session, tmp_path):
    from metaopt.posttrain.sweep import run

    exp = load_tiny(
        tmp_path,
        "posttrain.curricula=[sec, uniform]",
        "posttrain.scheduler=pbt",
        "posttrain.pbt_interval=1",
        "posttrain.samples_to_log=0",
        "posttrain.roles.mode=colocated",
    )
    rows = run(exp, verbose=0)
    assert len(rows) == 2 and all(r["error"] is None and r["curves"]["grpo_step"][-1] == 4 for r in rows)
    lrs = {round(lr, 12) for r in rows for lr in r["curves"]["lr"]}
    assert len(lrs) > 1  # both started at optimizer.lr; PBT's explore step gave one of them a new lr


@pytest.mark.parametrize(
    "override, field",
    [
        ("posttrain.grpo.group_size=1", "posttrain.grpo.group_size"),
        ("posttrain.grpo.loss_aggregation=sum", "posttrain.grpo.loss_aggregation"),
        ("posttrain.grpo.minibatch_size=0", "posttrain.grpo.minibatch_size"),
        ("posttrain.grpo.minibatch_size=17", "posttrain.grpo.minibatch_size: must be <= prompts_per_step"),
        ("posttrain.tasks=[{name: calculus, levels: [1]}]", "posttrain.tasks"),
        ("posttrain.curricula=[fancy]", "posttrain.curricula"),
        ("posttrain.model.heads=3", "posttrain.model.heads"),
        ("posttrain.optimizer={name: adam}", "posttrain.optimizer.name"),
    ],
)
def test_bad_posttrain_input_is_one_error_line(tmp_path, capsys, override, field):
    path = tmp_path / "grpo.yaml"
    path.write_text((EXPERIMENTS / "grpo_tiny.yaml").read_text())
    rc = cli.main(["run", str(path), "--set", override])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"metaopt: error: {field}"), err


def test_missing_model_path_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "grpo.yaml"
    path.write_text((EXPERIMENTS / "grpo_tiny.yaml").read_text())
    rc = cli.main(["run", str(path), "--set", f"posttrain.model.path={tmp_path / 'no-model'}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("metaopt: error: posttrain.model.path: ") and "no-model" in err


def test_packed_weights_round_trip_every_dtype():
    from metaopt.posttrain.roles import pack_weights, unpack_weights

    weights = {
        "w": torch.randn(3, 4),
        "b": torch.randn(4).to(torch.bfloat16),
        "steps": torch.tensor([7, 8]),
        "empty": torch.zeros(0, 2),
    }
    restored = unpack_weights(pack_weights(weights))
    assert list(restored) == list(weights)
    for name, tensor in weights.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor)


def test_prompts_are_split_evenly_over_rollout_workers():
    from metaopt.posttrain.loop import split_prompts

    assert split_prompts(5, 2) == [slice(0, 2), slice(2, 5)]
    assert split_prompts(1, 3) == [slice(0, 1)]
    assert sum(s.stop - s.start for s in split_prompts(16, 3)) == 16


def test_a_trial_larger_than_the_cluster_is_one_error_line(ray_session, tmp_path, capsys):
    path = tmp_path / "grpo.yaml"
    path.write_text((EXPERIMENTS / "grpo_tiny.yaml").read_text())
    rc = cli.main(
        [
            "run",
            str(path),
            "--set",
            "posttrain.roles.cpus_per_actor=1.5",
            "--set",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("metaopt: error: posttrain.roles: one trial needs 3.2 CPUs"), err


class FakeRollout:
    """A rollout worker that answers "1".."G" to every prompt, whatever the weights (no model)."""

    def sample(self, prompts, group_size, max_new_tokens, temperature, seed):
        from metaopt.posttrain.sampling import RolloutBatch

        rows = len(prompts) * group_size
        return RolloutBatch(
            input_ids=torch.zeros(rows, 2, dtype=torch.long),
            attention_mask=torch.ones(rows, 2, dtype=torch.long),
            completion_mask=torch.ones(rows, 1),
            completions=[str(1 + i % group_size) for i in range(rows)],
            prompt_length=1,
            group_size=group_size,
        )

    def set_weights(self, weights, reference=False):
        pass


class FakeLearner:
    def set_schedule(self, schedule):
        pass

    def weights(self):
        return None

    def step(self, batch, advantages):
        return {"loss": 0.0}, None


def recorded_draws(tmp_path, *overrides):
    """GRPORun on in-process fake roles; the curriculum's sample/update/advance calls in order, with SEC's Q
    at each draw."""
    from metaopt.posttrain.loop import GRPORun
    from metaopt.posttrain.roles import Roles

    section = load_tiny(tmp_path, "posttrain.warmup.steps=0", "posttrain.grpo.beta=0", *overrides).section
    run = GRPORun(section, "sec", 0, Roles([FakeRollout()], FakeLearner(), None, remote=False))
    events = []
    for name in ("sample", "update", "advance"):
        method = getattr(run.curriculum, name)

        def record(*args, _method=method, _name=name):
            events.append((_name, run.curriculum.q.copy()) if _name == "sample" else (_name, None))
            return _method(*args)

        setattr(run.curriculum, name, record)
    try:
        for _ in range(3):
            run.step()
    finally:
        run.taskset.close()
    return [name for name, _ in events], [q for name, q in events if name == "sample"]


def test_overlapped_rollouts_keep_the_papers_curriculum_order_unless_told(tmp_path):
    """SEC (Chen et al. 2025, Alg. 1): Q is updated with step t's rewards before step t+1's prompts are drawn.
    With overlapped rollouts that is the default order too (the same draws as without overlap, from the same
    Q); curriculum.update=overlapped draws step t+1 before step t's update (one step of lag)."""
    paper = ["sample", "update", "advance"] * 3
    order, q_serial = recorded_draws(tmp_path, "posttrain.roles.overlap=false")
    assert order == paper
    order, q_overlap = recorded_draws(tmp_path, "posttrain.roles.overlap=true")
    assert order == [*paper, "sample"]  # step 4's rollouts start during step 3's learner update
    assert all(np.array_equal(a, b) for a, b in zip(q_serial, q_overlap))
    assert any(q.any() for q in q_serial)  # the fake's rewards do move Q
    order, _ = recorded_draws(tmp_path, "posttrain.roles.overlap=true", "posttrain.curriculum.update=overlapped")
    assert order == [
        "sample",
        "sample",
        "update",
        "advance",
        "sample",
        "update",
        "advance",
        "sample",
        "update",
        "advance",
    ]
