"""Federated rounds over a client pool, in-process or Ray client actors: strategies learn digits, the loop
aggregates exactly what its pool brings back, a client killed mid-round does not stop the
round and is back for later rounds, clients late for the round's one deadline are left out and cancelled, and a
run restored from its per-round state continues identically."""

from __future__ import annotations

import math
import os
import signal
import threading

import pytest
import torch

from conftest import EXPERIMENTS
from metaopt import config
from metaopt.errors import ConfigError
from metaopt.federated.clients import Client, ClientPool, InProcessClients, RayClients
from metaopt.federated.data import load_dataset, make_client_shards
from metaopt.federated.rounds import FederatedRun, RoundSettings
from metaopt.federated.strategies import ClientUpdate, make_strategy

HIDDEN = (16,)


@pytest.fixture(scope="module")
def shards():
    return make_client_shards(load_dataset("digits"), 4, "dirichlet", 0.5, 0.2, seed=0)


def local_run(shards, strategy: str, **settings) -> FederatedRun:
    clients = InProcessClients([Client(i, s, 64, 10, HIDDEN) for i, s in enumerate(shards)])
    return FederatedRun(shards, clients, make_strategy(strategy), RoundSettings(**settings), 64, 10, HIDDEN)


@pytest.mark.parametrize("strategy", ["fedavg", "fedhyper_g", "fedhyper_sl", "fedhyper_cl"])
def test_strategies_learn_digits_in_process(shards, strategy):
    run = local_run(shards, strategy, lr0=0.1, epochs=2)
    first = run.run_round()
    for _ in range(7):
        last = run.run_round()
    assert last["accuracy"] > max(first["accuracy"] + 0.15, 0.5), (strategy, first, last)  # chance: 0.1
    assert last["participants"] == 4 and last["failed_clients"] == 0
    if strategy == "fedhyper_cl":
        assert last["client_lr_max_used"] != pytest.approx(last["client_lr"])  # per-batch lr actually adapted


def test_resumed_run_continues_identically(shards):
    straight = local_run(shards, "fedhyper_g", lr0=0.05, fraction=0.5)
    for _ in range(4):
        want = straight.run_round()
    resumed = local_run(shards, "fedhyper_g", lr0=0.05, fraction=0.5)
    for _ in range(2):
        resumed.run_round()
    saved = resumed.state_dict()
    fresh = local_run(shards, "fedhyper_g", lr0=0.05, fraction=0.5)
    fresh.load_state_dict(saved)
    for _ in range(2):
        got = fresh.run_round()
    torch.testing.assert_close(fresh.global_params, straight.global_params)
    assert got["accuracy"] == want["accuracy"] and got["global_lr"] == want["global_lr"]


def test_the_server_loop_takes_only_what_its_client_pool_brings_back(shards):
    """The loop knows no Ray (its module imports none): a pool that reports a client left out gives the round
    exactly the other clients' updates, and the left-out client in ``failed_ids``."""
    import ast
    import inspect

    from metaopt.federated import rounds
    from metaopt.federated.clients import RoundAnswers

    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(inspect.getsource(rounds)))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in getattr(node, "names", [])
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(ast.parse(inspect.getsource(rounds)))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "ray" not in imported

    class ClientTwoDown(InProcessClients):
        def train_round(self, chosen, global_params, settings, **deadline):
            answers = super().train_round([i for i in chosen if i != 2], global_params, settings, **deadline)
            return RoundAnswers(answers.results, {2: "failed (RayActorError)"})

    clients = [Client(i, s, 64, 10, HIDDEN) for i, s in enumerate(shards)]
    run = FederatedRun(shards, ClientTwoDown(clients), make_strategy("fedavg"), RoundSettings(lr0=0.05), 64, 10, HIDDEN)
    start = run.global_params.clone()
    got = run.run_round()
    assert got["failed_ids"] == [2] and got["failed_clients"] == 1 and got["participants"] == 3
    fedavg = make_strategy("fedavg")
    updates = [
        ClientUpdate(r.delta, r.num_samples, r.local_lr)
        for r in (clients[i].train(start, round_index=0, epochs=1, lr=0.05) for i in (0, 1, 3))
    ]
    want, _, _ = fedavg.aggregate(fedavg.init(start), start, updates)
    torch.testing.assert_close(run.global_params, want)


@pytest.fixture(scope="module")
def pool(ray_session, shards):
    """One actor per shard for the module's Ray tests (Ray restarts a killed one)."""
    pool = ClientPool(shards, 64, 10, HIDDEN, max_restarts=2)
    yield pool
    pool.close()


def test_a_client_killed_mid_round_is_left_out_and_back_next_round(pool, shards):
    import ray

    run = FederatedRun(shards, pool, make_strategy("fedavg"), RoundSettings(lr0=0.05, epochs=40), 64, 10, HIDDEN)
    victim = pool.actors[1]
    pid = ray.get(victim.pid.remote())
    timer = threading.Timer(1.0, os.kill, args=(pid, signal.SIGKILL))  # while the round is training
    timer.start()
    killed_round = run.run_round()
    timer.join()
    assert killed_round["failed_ids"] == [1] and killed_round["participants"] == 3
    assert math.isfinite(killed_round["accuracy"])
    run.settings = RoundSettings(lr0=0.05, epochs=1)
    next_round = run.run_round()
    assert next_round["failed_clients"] == 0 and next_round["participants"] == 4, next_round
    assert ray.get(victim.pid.remote()) != pid  # a new process, restarted by Ray


@pytest.mark.parametrize("strategy", ["fedavg", "fedhyper_cl"])
def test_rounds_on_client_actors_equal_rounds_in_process(pool, shards, strategy):
    """The Ray path (one packed request per round: numpy model, settings, CL rule) trains exactly what the
    in-process path does."""
    remote = FederatedRun(shards, pool, make_strategy(strategy), RoundSettings(lr0=0.1, fraction=0.5), 64, 10, HIDDEN)
    local = local_run(shards, strategy, lr0=0.1, fraction=0.5)
    for _ in range(3):
        got, want = remote.run_round(), local.run_round()
        assert got["participants"] == want["participants"] == 2 and got["failed_clients"] == 0
        assert got["client_lr_max_used"] == want["client_lr_max_used"]
    assert remote.global_params.dtype == local.global_params.dtype == torch.float32
    torch.testing.assert_close(remote.global_params, local.global_params)


def test_clients_late_for_the_round_deadline_are_left_out_cancelled_and_back_next_round(pool, shards):
    """Two stragglers: the round ends at its one deadline (not one timeout per straggler in turn), aggregates
    exactly the punctual clients' updates, and the cancelled stragglers stop, so the next round has them all."""
    import ray

    class Straggler(Client):  # defined here so Ray ships it by value to the actor
        def train(self, global_params, *, round_index, epochs, **settings):
            slow = 10_000 if round_index == 1 else 1  # about a minute of local epochs, in the second round only
            return super().train(global_params, round_index=round_index, epochs=epochs * slow, **settings)

    stragglers = [
        ray.remote(num_cpus=0, max_restarts=0)(Straggler).remote(i, shards[i], 64, 10, HIDDEN) for i in (1, 2)
    ]
    try:
        run = FederatedRun(
            shards,
            RayClients([pool.actors[0], *stragglers, pool.actors[3]]),
            make_strategy("fedavg"),
            RoundSettings(lr0=0.05, timeout_s=120),
            64,
            10,
            HIDDEN,
        )
        # a first round warms the actors up (a fresh actor's first local training takes seconds: torch's lazy set-up)
        assert run.run_round()["participants"] == 4
        deadline = 2.0
        run.settings = RoundSettings(lr0=0.05, timeout_s=deadline)
        start, lr = run.global_params.clone(), run.client_lr
        late = run.run_round()
        assert late["failed_ids"] == [1, 2] and late["participants"] == 2, late
        assert deadline * 0.9 <= late["round_seconds"] < deadline * 1.5, late
        fedavg = make_strategy("fedavg")
        punctual = [Client(i, shards[i], 64, 10, HIDDEN).train(start, round_index=1, epochs=1, lr=lr) for i in (0, 3)]
        want, _, _ = fedavg.aggregate(
            fedavg.init(start), start, [ClientUpdate(r.delta, r.num_samples, r.local_lr) for r in punctual]
        )
        torch.testing.assert_close(run.global_params, want)
        following = run.run_round()
        assert following["participants"] == 4 and following["failed_clients"] == 0, following
        assert following["round_seconds"] < deadline
    finally:
        for s in stragglers:
            ray.kill(s)


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_round_timeout_must_be_a_finite_positive_number_of_seconds(value):
    with pytest.raises(ConfigError, match=r"federated\.round_timeout_s"):
        config.load(EXPERIMENTS / "fedhyper_tiny.yaml", [f"federated.round_timeout_s={value}"])
    with pytest.raises(ConfigError, match="round_timeout_s: must be a finite number of seconds > 0"):
        RoundSettings(timeout_s=float(value))
    assert (
        config.load(EXPERIMENTS / "fedhyper_tiny.yaml", ["federated.round_timeout_s=2.5"]).section.round_timeout_s
        == 2.5
    )


def test_fedexp_rounds_report_the_average_of_the_last_two_iterates_and_rates_are_logged(shards):
    from metaopt.federated.clients import evaluate

    run = local_run(shards, "fedexp", lr0=0.05)
    before = run.global_params.clone()
    got = run.run_round()
    want = evaluate(run.model, 0.5 * (before + run.global_params), run.val_x, run.val_y)
    assert got["loss"] == pytest.approx(want["loss"]) and got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["global_lr"] >= 1.0 and got["client_lr_factor"] == pytest.approx(1.0)
    sl = local_run(shards, "fedhyper_sl", lr0=0.05)
    rows = [sl.run_round() for _ in range(3)]
    assert rows[-1]["client_lr_factor"] == pytest.approx(rows[-1]["client_lr"] / 0.05)


def test_section_hands_aggregation_momentum_and_n_c_to_strategies_and_clients():
    exp = config.load(EXPERIMENTS / "fedhyper_tiny.yaml", ["federated.client_momentum=0.5"])
    section = exp.section
    assert section.aggregation == "mean" and section.client_momentum == 0.5
    full = section.strategy_options("fedhyper_full")
    assert full == {"aggregation": "mean", "num_clients_total": section.num_clients, "fraction": section.fraction}
    assert section.strategy_options("fedavg") == {"aggregation": "mean"}
    assert section.strategy_options("fedexp") == {}  # FedExP's paper: always the unweighted mean
    with pytest.raises(ConfigError, match=r"federated\.client_momentum: applies to client_optimizer sgd"):
        config.load(
            EXPERIMENTS / "fedhyper_tiny.yaml", ["federated.client_momentum=0.5", "federated.client_optimizer=adam"]
        )
    with pytest.raises(ConfigError, match=r"federated\.client_momentum"):
        config.load(EXPERIMENTS / "fedhyper_tiny.yaml", ["federated.client_momentum=1.0"])
