"""Federated trainings as Tune trials (a round per iteration) with Ray client actors, tracked in MLflow; a killed
trial resumes from its last round; a missing local dataset is one error line before anything starts."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from conftest import EXPERIMENTS, KillTrialProcess, assert_runs_finished
from metaopt import cli, config, tracking


def load_tiny(tmp_path, *overrides: str):
    base = [f"ray.storage_path={tmp_path / 'ray_results'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    return config.load(EXPERIMENTS / "fedhyper_tiny.yaml", [*base, *overrides])


def client_actors_created() -> int:
    """Client actors this Ray session has created so far, alive or dead (the GCS actor table; the tests' Ray has
    no dashboard for the state API)."""
    from ray._private import state

    return sum(1 for info in state.actors().values() if info["ActorClassName"].endswith("Client"))


def in_process_accuracies(exp, strategy: str) -> list[float]:
    """The same federated training as the trial's, with in-process clients: the reference for the Tune path."""
    return [row["accuracy"] for row in in_process_rounds(exp, strategy)]


def in_process_rounds(exp, strategy: str) -> list[dict]:
    """Every round's metrics of :func:`in_process_accuracies`' training."""
    from metaopt.federated.clients import Client, InProcessClients
    from metaopt.federated.data import load_dataset, make_client_shards
    from metaopt.federated.rounds import FederatedRun, RoundSettings
    from metaopt.federated.strategies import make_strategy
    from metaopt.federated.tune import input_shape

    s, seed = exp.section, exp.section.seeds[0]
    data = load_dataset(s.dataset, s.data_root, seed=seed)
    shards = make_client_shards(data, s.num_clients, s.partition, s.alpha, s.val_fraction, seed=seed)
    hidden = tuple(s.hidden)
    settings = RoundSettings(
        fraction=s.fraction,
        epochs=s.local_epochs,
        lr0=s.lrs[0],
        optimizer=s.client_optimizer,
        batch_size=s.batch_size,
        seed=seed,
    )
    shape = (input_shape(data), data.num_classes)
    run = FederatedRun(
        shards,
        InProcessClients([Client(i, shard, *shape, hidden) for i, shard in enumerate(shards)]),
        make_strategy(strategy),
        settings,
        *shape,
        hidden,
    )
    return [run.run_round() for _ in range(s.rounds)]


def test_federated_sweep_tracks_rounds_and_plots(ray_session, tmp_path):
    from metaopt.federated.sweep import run

    exp = load_tiny(tmp_path)
    created_before = client_actors_created()
    rows = run(exp, verbose=0)
    assert sorted(r["strategy"] for r in rows) == ["fedavg", "fedhyper_g"]
    # One trial at a time: the second ran on the first one's trainable actor and kept its 4 client actors
    # (same shards), and they trained it exactly as fresh in-process clients do.
    assert client_actors_created() - created_before == exp.section.num_clients
    for r in rows:
        assert r["error"] is None and r["curves"]["round"] == [1, 2, 3]
        assert math.isfinite(r["final_accuracy"]) and r["final_accuracy"] > 0.2
        assert r["curves"]["accuracy"] == pytest.approx(in_process_accuracies(exp, r["strategy"]), abs=1e-9)
    hyper = next(r for r in rows if r["strategy"] == "fedhyper_g")
    assert hyper["curves"]["global_lr"][0] == 1.0  # round 1: no previous Δ, so a = 0
    client = MlflowClient(exp.tracking.uri)
    experiment = client.get_experiment_by_name("fedhyper_tiny")
    parent = client.search_runs([experiment.experiment_id], "tags.`metaopt.role` = 'sweep'")[0]
    assert {"accuracy.png", "learning_rates.png", "summary.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = tracking.child_runs(client, experiment.experiment_id, parent.info.run_id)
    assert len(children) == 2
    history = client.get_metric_history(children[0].info.run_id, "accuracy")
    assert [m.step for m in history] == [1, 2, 3]


def test_grid_runs_seed_major_so_trials_keep_their_client_actors(ray_session, tmp_path):
    from metaopt.federated.sweep import run

    # Each trial (its actor and 2 clients) takes both CPUs, as in fedhyper_digits.yaml: one trial actor runs them all.
    exp = load_tiny(
        tmp_path,
        "federated.seeds=[0, 1]",
        "federated.rounds=1",
        "federated.num_clients=2",
        "ray.cpus_per_trial=1",
        "federated.cpus_per_client=0.5",
    )
    created_before = client_actors_created()
    rows = sorted(run(exp, verbose=0), key=lambda r: r["trial_id"])
    assert [(r["seed"], r["strategy"]) for r in rows] == [
        (0, "fedavg"),
        (0, "fedhyper_g"),
        (1, "fedavg"),
        (1, "fedhyper_g"),
    ]
    assert all(r["error"] is None for r in rows)
    assert client_actors_created() - created_before == 2 * 2  # one set of 2 clients per seed, not per trial


def test_killed_federated_trial_resumes_without_losing_a_round(ray_session, tmp_path):
    from metaopt.federated.sweep import run

    # 2 client actors, not 4: the resumed trial starts its clients again, and the resume is the point here
    exp = load_tiny(tmp_path, "federated.strategies=[fedhyper_g]", "federated.rounds=4", "federated.num_clients=2")
    killer = KillTrialProcess(at_iteration=2)
    (row,) = run(exp, callbacks=[killer], verbose=0)
    assert killer.killed, "the test did not kill anything"
    assert row["error"] is None
    rounds = row["curves"]["round"]
    # rounds 1, 2 reported; killed as round 2 was reported; resumed from the last checkpoint (round 1 or 2)
    assert rounds[:2] == [1, 2] and rounds[-1] == 4 and set(rounds) == {1, 2, 3, 4} and rounds == sorted(rounds)
    # and every round, redone or not, is the uninterrupted training's: accuracy, server lr, client lr
    want = in_process_rounds(exp, "fedhyper_g")
    for key in ("accuracy", "global_lr", "client_lr"):
        assert row["curves"][key] == pytest.approx([want[r - 1][key] for r in rounds], abs=1e-9), key
    assert_runs_finished(exp.tracking.uri, "fedhyper_tiny", at_least=2)


def test_missing_local_dataset_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "cifar.yaml"
    path.write_text((EXPERIMENTS / "fedhyper_tiny.yaml").read_text())
    rc = cli.main(
        ["run", str(path), "--set", "federated.dataset=cifar10", "--set", f"federated.data_root={tmp_path / 'nowhere'}"]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("metaopt: error: federated.data_root: ") and str(tmp_path / "nowhere") in err
    assert len(err.splitlines()) == 1


def test_pbt_on_top_adapts_the_initial_local_lr(ray_session, tmp_path):
    from metaopt.federated.sweep import run

    exp = load_tiny(
        tmp_path,
        "federated.strategies=[fedavg]",
        "federated.lrs=[0.003, 0.3]",
        "federated.rounds=4",
        "federated.scheduler=pbt",
        "federated.pbt_interval=2",
        "federated.num_clients=2",
    )
    rows = run(exp, verbose=0)
    assert len(rows) == 2 and all(r["error"] is None and r["curves"]["round"][-1] == 4 for r in rows)
    lrs = [lr for r in rows for lr in r["curves"]["client_lr"]]
    assert len({round(lr, 9) for lr in lrs}) > 2  # PBT explored new initial lrs beyond the two it started with


def test_rounds_to_target_is_the_first_round_reaching_it_and_censored_one_past_the_last():
    from metaopt.federated.sweep import rounds_to_target

    curve = [0.2, 0.6, 0.89, 0.85, 0.95]
    assert rounds_to_target(curve, 0.89) == 3  # 1-based, first reaching (>=), later dips do not matter
    assert rounds_to_target(curve, 0.1) == 1
    assert rounds_to_target(curve, 0.96) == 6  # never reached: censored at rounds + 1
    assert math.isnan(rounds_to_target(curve, None)) and math.isnan(rounds_to_target([], 0.5))


def test_a_trial_row_reports_rounds_to_the_sections_target_and_the_final_global_lr(monkeypatch):
    from types import SimpleNamespace

    from metaopt.federated import sweep

    result = SimpleNamespace(
        metrics={"trial_id": "t0"},
        path="t0",
        error=None,
        config={"exp": {"target_accuracy": 0.5}, "strategy": "fedhyper_g", "lr": 0.1, "seed": 0},
    )
    curves = {"accuracy": [0.3, 0.55, 0.6], "global_lr": [1.0, 1.2, 1.4], "round": [1, 2, 3]}
    monkeypatch.setattr(sweep.report, "progress_curves", lambda result, keep: {k: list(v) for k, v in curves.items()})
    row = sweep.trial_row(result)
    assert row["rounds_to_target"] == 2 and row["final_global_lr"] == 1.4 and row["final_accuracy"] == 0.6
    assert {"rounds_to_target", "final_global_lr"} <= set(sweep.SUMMARY_COLUMNS)
