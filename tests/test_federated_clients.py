"""Federated clients: local training returns Δ = local − global, FedAvg over in-process clients learns digits,
a per-batch lr rule (FedHyper-CL's hook) changes the lrs used, and a Ray client actor comes back after a kill."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from metaopt.errors import ConfigError
from metaopt.federated.clients import (
    Client,
    ClientPool,
    RoundCancelled,
    build_model,
    evaluate,
    flat_params,
    local_train,
    ray_cancel_check,
    set_flat_params,
)
from metaopt.federated.data import load_dataset, make_client_shards


@pytest.fixture(scope="module")
def digits_clients():
    data = load_dataset("digits")
    shards = make_client_shards(data, 4, "iid", 0.5, 0.2, seed=0)
    return data, shards


def test_local_training_returns_the_model_change(digits_clients):
    _data, shards = digits_clients
    client = Client(0, shards[0], 64, 10, hidden=(16,))
    torch.manual_seed(0)
    global_params = flat_params(build_model(64, 10, (16,)))
    result = client.train(global_params, round_index=0, epochs=1, lr=0.1)
    assert result.delta.shape == global_params.shape and result.delta.abs().sum() > 0
    assert result.num_samples == shards[0].num_train and result.lrs_used == [0.1] * len(result.lrs_used)
    again = client.train(global_params, round_index=0, epochs=1, lr=0.1)
    torch.testing.assert_close(again.delta, result.delta)  # same round and client: same batches


def test_fedavg_over_clients_learns_digits(digits_clients):
    data, shards = digits_clients
    clients = [Client(i, s, 64, 10, hidden=(16,)) for i, s in enumerate(shards)]
    torch.manual_seed(0)
    model = build_model(64, 10, (16,))
    params = flat_params(model)
    before = evaluate(model, params, data.x, data.y)["accuracy"]
    for round_index in range(8):
        results = [c.train(params, round_index=round_index, epochs=2, lr=0.3) for c in clients]
        total = sum(r.num_samples for r in results)
        params = params + sum(r.delta * (r.num_samples / total) for r in results)
    after = evaluate(model, params, data.x, data.y)["accuracy"]
    assert before < 0.3 and after > 0.85, (before, after)


def test_per_batch_lr_rule_changes_the_lrs_used(digits_clients):
    _, shards = digits_clients
    client = Client(1, shards[1], 64, 10, hidden=(16,))
    params = flat_params(build_model(64, 10, (16,)))

    def grow(beta, change, previous, step):
        assert change.shape == params.shape and (previous is None) == (step == 0)
        return min(beta * 1.1, 10.0)

    result = client.train(params, round_index=0, epochs=1, lr=0.01, lr_rule=grow)
    assert result.lrs_used[0] == pytest.approx(0.01) and result.lrs_used[1] == pytest.approx(0.011)
    assert max(result.lrs_used) <= 0.1 + 1e-12


def test_local_training_stops_between_batches_once_cancelled(digits_clients):
    """How a client honours the server's ray.cancel of a late round (Ray only raises a flag in a sync actor)."""
    _, shards = digits_clients
    asked = []

    def cancelled_after_three_batches() -> bool:
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(RoundCancelled, match="after 3 batches"):
        Client(0, shards[0], 64, 10, hidden=(16,)).train(
            flat_params(build_model(64, 10, (16,))),
            round_index=0,
            epochs=50,
            lr=0.1,
            should_stop=cancelled_after_three_batches,
        )
    assert ray_cancel_check() is None  # in this process (no Ray task) there is nothing to cancel


def test_unknown_client_optimizer_is_a_clear_error(digits_clients):
    _, shards = digits_clients
    with pytest.raises(ConfigError, match="sgd, adam"):
        Client(0, shards[0], 64, 10).train(
            flat_params(build_model(64, 10)), round_index=0, epochs=1, lr=0.1, optimizer="lbfgs"
        )


def test_client_actor_is_restarted_with_its_shard_after_its_process_dies(ray_session, digits_clients):
    import ray

    _, shards = digits_clients
    pool = ClientPool(shards[2:3], 64, 10, (16,), max_restarts=2)
    (actor,) = pool.actors
    params = flat_params(build_model(64, 10, (16,)))
    first = ray.get(actor.train.remote(params, round_index=0, epochs=1, lr=0.1))
    os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
    deadline = time.time() + 60
    while True:  # the first call after the kill may fail while Ray restarts the actor
        try:
            again = ray.get(actor.train.remote(params, round_index=0, epochs=1, lr=0.1), timeout=60)
            break
        except ray.exceptions.RayActorError:
            assert time.time() < deadline, "the actor did not come back"
            time.sleep(0.5)
    torch.testing.assert_close(again.delta, first.delta)  # restarted with the same shard and seeds
    pool.close()


def test_cl_rule_sees_each_batch_change_and_carries_it_across_local_epochs(digits_clients):
    """FedHyper-CL as the authors' code: u_k = batch k's parameter change, u_{k−1} None only for the round's
    first batch (the rule then uses Δ_{t−1}), (u_{k−1}, β_{k−1}) carried over the epoch boundary, lr = lr0·β."""
    _, shards = digits_clients
    shard = shards[0]
    model = build_model(64, 10, (16,))
    params = flat_params(model)
    calls = []

    def record(beta, change, previous, step):
        calls.append((beta, change.clone(), None if previous is None else previous.clone()))
        return beta * 1.05

    batch = (shard.num_train + 1) // 2  # two batches per epoch
    result = local_train(model, params, shard, epochs=2, lr=0.01, batch_size=batch, lr_rule=record, momentum=0.5)
    assert len(calls) == 4 and calls[0][2] is None
    for k in range(1, 4):  # k = 2 is the second epoch's first batch: the state carried over
        assert torch.equal(calls[k][2], calls[k - 1][1]) and calls[k][0] == pytest.approx(1.05**k)
    assert result.lrs_used == pytest.approx([0.01 * 1.05**k for k in range(4)])
    torch.testing.assert_close(sum(c[1] for c in calls), result.delta, atol=1e-5, rtol=0)


def test_client_sgd_momentum_is_heavy_ball(digits_clients):
    """local SGD with momentum μ: b_k = μ b_{k−1} + g_k (b_1 = g_1), p_k = p_{k−1} − lr b_k (one full batch
    per epoch, so the batch order does not matter), checked by hand with autograd."""
    _, shards = digits_clients
    shard = shards[0]
    model = build_model(64, 10, (16,))
    params = flat_params(model)
    result = local_train(model, params, shard, epochs=3, lr=0.1, batch_size=shard.num_train, momentum=0.5)
    p, buf = params.clone(), None
    for _ in range(3):
        set_flat_params(model, p)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(shard.train_x), shard.train_y).backward()
        g = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
        buf = g if buf is None else 0.5 * buf + g
        p = p - 0.1 * buf
    torch.testing.assert_close(result.delta, p - params, atol=1e-5, rtol=0)
    plain = local_train(model, params, shard, epochs=3, lr=0.1, batch_size=shard.num_train)
    assert (plain.delta - result.delta).abs().max() > 1e-4
