"""metaopt.optim: schedules and optimizers, with optax as the oracle wherever it has one."""

from __future__ import annotations

import copy
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from metaopt.errors import ConfigError
from metaopt.optim import (
    SCHEDULE_NAMES,
    build_optax,
    build_optimizer,
    build_schedule,
    constant,
    cosine,
    linear_decay,
    piecewise_constant,
    resolve_optimizer_spec,
    set_learning_rate,
    set_optax_learning_rate,
    warmup,
)
from metaopt.optim import optimizer_names as registered_optimizers

OPTIMIZER_NAMES = registered_optimizers()  # the built-ins and the program optimizer symbolic registers

STEPS = np.arange(0, 1500, 7)  # crosses every boundary used below and runs past the end


def values(schedule, steps=STEPS):
    return np.array([schedule(int(s)) for s in steps], dtype=np.float64)


def oracle(optax_schedule, steps=STEPS):
    with jax.enable_x64(True):
        return np.array([optax_schedule(int(s)) for s in steps], dtype=np.float64)


# --------------------------------------------------------------------------- schedules


def test_constant_matches_optax():
    assert np.allclose(values(constant(0.3)), oracle(optax.constant_schedule(0.3)))


@pytest.mark.parametrize("end_lr", [0.0, 0.01])
def test_linear_decay_matches_optax(end_lr):
    ours = values(linear_decay(0.1, 1000, end_lr=end_lr))
    assert np.allclose(ours, oracle(optax.linear_schedule(0.1, end_lr, 1000)))


@pytest.mark.parametrize("end_lr", [0.0, 0.01])
def test_cosine_matches_optax(end_lr):
    ours = values(cosine(0.1, 1000, end_lr=end_lr))
    assert np.allclose(ours, oracle(optax.cosine_decay_schedule(0.1, 1000, alpha=end_lr / 0.1)))


@pytest.mark.parametrize("warmup_steps", [1, 100, 333])
def test_warmup_cosine_matches_optax(warmup_steps):
    ours = values(warmup(cosine(0.1, 1000 - warmup_steps, end_lr=0.001), warmup_steps))
    expected = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps, 1000, end_value=0.001)
    assert np.allclose(ours, oracle(expected))


def test_warmup_ramps_from_zero_to_the_wrapped_first_value():
    schedule = warmup(constant(0.2), 10)
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.1)
    assert schedule(10) == schedule(10_000) == 0.2


def test_warmup_of_zero_steps_is_the_schedule_itself():
    inner = cosine(0.1, 100)
    assert warmup(inner, 0) is inner


def test_piecewise_constant_matches_optax_scaled_jumps():
    segments = [(0, 0.1), (100, 0.05), (101, 0.2), (700, 0.001)]
    # optax writes each jump as a ratio to the previous value.
    scales = {start: lr / prev for (start, lr), (_, prev) in zip(segments[1:], segments)}
    steps = np.concatenate([STEPS, [99, 100, 101, 102, 699, 700]])
    expected = oracle(optax.piecewise_constant_schedule(0.1, scales), steps)
    assert np.allclose(values(piecewise_constant(segments), steps), expected)


def test_piecewise_constant_replays_exact_values():
    schedule = piecewise_constant([(0, 0.1), (50, 0.03)])
    assert [schedule(s) for s in (0, 49, 50, 10**9)] == [0.1, 0.1, 0.03, 0.03]


@pytest.mark.parametrize("factory", [linear_decay, cosine])
def test_steps_past_total_stay_at_end_lr(factory):
    schedule = factory(0.1, 100, end_lr=0.004)
    assert schedule(100) == pytest.approx(0.004)
    assert schedule(101) == schedule(10**7) == pytest.approx(0.004)


def test_negative_steps_read_as_step_zero_like_optax():
    for schedule in (linear_decay(0.1, 10), cosine(0.1, 10), warmup(constant(0.1), 5)):
        assert schedule(-3) == schedule(0)


def test_build_schedule_cosine_with_warmup_counts_warmup_in_total_steps():
    spec = {"name": "cosine", "lr": 0.1, "total_steps": 1000, "warmup_steps": 100}
    expected = optax.warmup_cosine_decay_schedule(0.0, 0.1, 100, 1000)
    assert np.allclose(values(build_schedule(spec)), oracle(expected))


def test_build_schedule_linear_with_warmup_matches_joined_optax_schedules():
    spec = {"name": "linear_decay", "lr": 0.1, "total_steps": 1000, "end_lr": 0.01}
    spec["warmup_steps"] = 50
    expected = optax.join_schedules([optax.linear_schedule(0.0, 0.1, 50), optax.linear_schedule(0.1, 0.01, 950)], [50])
    assert np.allclose(values(build_schedule(spec)), oracle(expected))


@pytest.mark.parametrize(
    ("spec", "direct"),
    [
        ({"name": "constant", "lr": 0.2}, constant(0.2)),
        ({"name": "linear_decay", "lr": 0.2, "total_steps": 300}, linear_decay(0.2, 300)),
        ({"name": "cosine", "lr": 0.2, "total_steps": 300, "end_lr": 0.1}, cosine(0.2, 300, 0.1)),
        (
            {"name": "piecewise_constant", "boundaries_and_lrs": [[0, 0.2], [40, 0.1]]},
            piecewise_constant([(0, 0.2), (40, 0.1)]),
        ),
    ],
)
def test_build_schedule_equals_the_factory(spec, direct):
    assert np.array_equal(values(build_schedule(spec)), values(direct))


def test_schedules_are_pure_floats_and_pickle():
    spec = {"name": "cosine", "lr": 0.1, "total_steps": 100, "warmup_steps": 10}
    schedule = build_schedule(spec)
    clone = pickle.loads(pickle.dumps(schedule))
    assert all(type(schedule(s)) is float for s in range(0, 120, 9))
    assert np.array_equal(values(clone, range(120)), values(schedule, range(120)))


def assert_config_error(excinfo, field):
    message = str(excinfo.value)
    assert excinfo.value.field == field
    assert message.startswith(f"{field}: ") and "\n" not in message


BAD_FACTORY_CALLS = [
    (lambda: constant(0), "lr"),
    (lambda: constant(-0.1), "lr"),
    (lambda: constant(math.nan), "lr"),
    (lambda: constant(math.inf), "lr"),
    (lambda: constant("0.1"), "lr"),
    (lambda: constant(True), "lr"),
    (lambda: linear_decay(0.1, 0), "total_steps"),
    (lambda: linear_decay(0.1, 10.0), "total_steps"),
    (lambda: linear_decay(0.1, 10, end_lr=-1e-3), "end_lr"),
    (lambda: cosine(-1, 10), "lr"),
    (lambda: cosine(0.1, -5), "total_steps"),
    (lambda: cosine(0.1, 10, end_lr=math.inf), "end_lr"),
    (lambda: warmup(constant(0.1), -1), "warmup_steps"),
    (lambda: warmup(0.1, 10), "schedule"),
    (lambda: piecewise_constant([]), "boundaries_and_lrs"),
    (lambda: piecewise_constant(None), "boundaries_and_lrs"),
    (lambda: piecewise_constant([(5, 0.1)]), "boundaries_and_lrs.0.0"),
    (lambda: piecewise_constant([(0, 0.1), (0, 0.2)]), "boundaries_and_lrs.1.0"),
    (
        lambda: piecewise_constant([(0, 0.1), (9, 0.2), (3, 0.3)]),
        "boundaries_and_lrs.2.0",
    ),
    (lambda: piecewise_constant([(0, 0.1), (9, 0.0)]), "boundaries_and_lrs.1.1"),
    (lambda: piecewise_constant([(0, 0.1, 3)]), "boundaries_and_lrs.0"),
    (lambda: piecewise_constant([(0, "0.1")]), "boundaries_and_lrs.0.1"),
]


@pytest.mark.parametrize(("call", "field"), BAD_FACTORY_CALLS)
def test_factories_reject_bad_arguments_naming_the_argument(call, field):
    with pytest.raises(ConfigError) as excinfo:
        call()
    assert_config_error(excinfo, field)


BAD_SCHEDULE_SPECS = [
    ({"name": "step", "lr": 0.1}, "schedule.name"),
    ({"lr": 0.1}, "schedule.name"),
    ({"name": "cosine", "total_steps": 10}, "schedule.lr"),
    ({"name": "cosine", "lr": 0.1}, "schedule.total_steps"),
    ({"name": "cosine", "lr": 0.1, "total_steps": 10, "decay": 2}, "schedule.decay"),
    ({"name": "constant", "lr": 0.1, "end_lr": 0.0}, "schedule.end_lr"),
    ({"name": "cosine", "lr": 0.0, "total_steps": 10}, "schedule.lr"),
    ({"name": "cosine", "lr": 0.1, "total_steps": 10, "warmup_steps": 10}, "schedule.warmup_steps"),
    ({"name": "constant", "lr": 0.1, "warmup_steps": -2}, "schedule.warmup_steps"),
    (
        {"name": "piecewise_constant", "boundaries_and_lrs": [[0, 0.1]], "warmup_steps": 5},
        "schedule.warmup_steps",
    ),
    (
        {"name": "piecewise_constant", "boundaries_and_lrs": [[1, 0.1]]},
        "schedule.boundaries_and_lrs.0.0",
    ),
    (["cosine"], "schedule"),
]


@pytest.mark.parametrize(("spec", "field"), BAD_SCHEDULE_SPECS)
def test_build_schedule_rejects_bad_specs_naming_the_field(spec, field):
    with pytest.raises(ConfigError) as excinfo:
        build_schedule(spec)
    assert_config_error(excinfo, field)


def test_schedules_take_integers_of_any_kind_as_step_counts():
    """Step counts computed with numpy (``np.int64``) are integers too; floats and bools are not."""
    same = [
        (piecewise_constant([(np.int64(0), 0.1), (np.int64(40), 0.05)]), piecewise_constant([(0, 0.1), (40, 0.05)])),
        (cosine(0.1, np.int64(100)), cosine(0.1, 100)),
        (linear_decay(0.1, np.int32(100)), linear_decay(0.1, 100)),
        (warmup(constant(0.1), np.int64(10)), warmup(constant(0.1), 10)),
        (
            build_schedule({"name": "cosine", "lr": 0.1, "total_steps": np.int64(100), "warmup_steps": np.int64(10)}),
            build_schedule({"name": "cosine", "lr": 0.1, "total_steps": 100, "warmup_steps": 10}),
        ),
    ]
    for from_numpy, from_python in same:
        assert np.array_equal(values(from_numpy), values(from_python))
    for bad in (np.float64(100.0), True, np.bool_(True), "100"):
        with pytest.raises(ConfigError) as excinfo:
            cosine(0.1, bad)
        assert excinfo.value.field == "total_steps"


def test_unknown_schedule_name_lists_the_allowed_names():
    with pytest.raises(ConfigError) as excinfo:
        build_schedule({"name": "step", "lr": 0.1})
    assert all(name in str(excinfo.value) for name in SCHEDULE_NAMES)


# --------------------------------------------------------------------------- optimizers


def rosenbrock(xy):
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "sgd", "lr": 1e-3},
        {"name": "sgd", "lr": 1e-3, "nesterov": True, "weight_decay": 1e-4},
        {"name": "adamw", "lr": 5e-2},
        {"name": "lion", "lr": 1e-2},
    ],
    ids=lambda spec: "-".join(str(v) for v in spec.values()),
)
def test_torch_optimizers_decrease_rosenbrock(spec):
    xy = torch.tensor([-1.5, 2.0], requires_grad=True)
    optimizer = build_optimizer([xy], spec)
    start = rosenbrock(xy).item()
    for _ in range(500):
        optimizer.zero_grad()
        rosenbrock(xy).backward()
        optimizer.step()
    assert rosenbrock(xy).item() < 0.05 * start  # from 12.5 down the curved valley


def test_build_optimizer_uses_the_documented_classes_and_defaults():
    from pytorch_optimizer import Lion

    params = [torch.zeros(3, requires_grad=True)]
    sgd = build_optimizer(params, {"name": "sgd"})
    adamw = build_optimizer(params, {"name": "adamw"})
    lion = build_optimizer(params, {"name": "lion"})
    assert type(sgd) is torch.optim.SGD and type(adamw) is torch.optim.AdamW and type(lion) is Lion
    expected_sgd = {"lr": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    assert {key: sgd.defaults[key] for key in expected_sgd} == expected_sgd
    assert adamw.defaults["betas"] == (0.9, 0.999) and adamw.defaults["weight_decay"] == 0.01
    assert lion.defaults["betas"] == (0.9, 0.99) and lion.defaults["weight_decay"] == 0.0
    assert OPTIMIZER_NAMES == ("sgd", "adamw", "lion", "program")  # built-ins, then what providers register


# A badly conditioned quadratic 0.5 p'Ap - b'p: gradients of mixed sign and size.
_RNG = np.random.default_rng(0)
_M = _RNG.normal(size=(6, 6))
A = _M @ _M.T / 6 + np.diag(np.linspace(0.1, 3.0, 6))
B = _RNG.normal(size=6)
P0 = _RNG.normal(size=6)


def quadratic_grad(p):
    return A @ p - B


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "lion", "lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 0.1},
        {"name": "adamw", "lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05},
        {"name": "sgd", "lr": 5e-2, "momentum": 0.7, "nesterov": True, "weight_decay": 0.02},
    ],
    ids=lambda spec: spec["name"],
)
def test_torch_and_optax_take_the_same_steps(spec):
    torch_p = torch.tensor(P0, dtype=torch.float64, requires_grad=True)
    optimizer = build_optimizer([torch_p], spec)
    with jax.enable_x64(True):
        tx = build_optax(spec)
        jax_p = jnp.asarray(P0, dtype=jnp.float64)
        state = tx.init(jax_p)
        update = jax.jit(tx.update)
        for step in range(100):
            torch_p.grad = torch.from_numpy(quadratic_grad(torch_p.detach().numpy()))
            optimizer.step()
            updates, state = update(jnp.asarray(quadratic_grad(np.asarray(jax_p))), state, jax_p)
            jax_p = optax.apply_updates(jax_p, updates)
            same = np.allclose(torch_p.detach().numpy(), np.asarray(jax_p), rtol=1e-9, atol=1e-9)
            assert same, f"diverged at step {step}"
    assert not np.allclose(np.asarray(jax_p), P0)  # it did move


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_set_learning_rate_writes_every_param_group_and_keeps_state(name):
    params = [torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)]
    extra = {"program": "adamw"} if name == "program" else {}
    optimizer = build_optimizer([{"params": [p]} for p in params], {"name": name, "lr": 0.1, **extra})
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    before = copy.deepcopy(optimizer.state_dict()["state"])
    set_learning_rate(optimizer, 0.025)
    assert [group["lr"] for group in optimizer.param_groups] == [0.025, 0.025]
    after = optimizer.state_dict()["state"]
    assert before.keys() == after.keys() and len(after) == 2
    for index, state in before.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(after[index][key]), torch.as_tensor(value))


def test_set_learning_rate_changes_the_actual_step_size():
    p = torch.zeros(4, requires_grad=True)
    sgd = build_optimizer([p], {"name": "sgd", "lr": 0.1, "momentum": 0.0})
    grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    for lr in (0.1, 0.01, 0.0):
        set_learning_rate(sgd, lr)
        before = p.detach().clone()
        p.grad = grad.clone()
        sgd.step()
        assert torch.allclose(p.detach() - before, -lr * grad)


def test_set_learning_rate_scales_lion_sign_steps():
    p = torch.zeros(3, requires_grad=True)
    lion = build_optimizer([p], {"name": "lion", "lr": 0.1})
    for lr in (0.1, 0.004):
        set_learning_rate(lion, lr)
        before = p.detach().clone()
        p.grad = torch.tensor([3.0, -0.2, 1e-4])
        lion.step()
        assert torch.allclose((p.detach() - before).abs(), torch.full((3,), lr))


@pytest.mark.parametrize("lr", [-0.1, math.nan, math.inf, "0.1"])
def test_set_learning_rate_rejects_bad_values(lr):
    optimizer = build_optimizer([torch.zeros(1, requires_grad=True)], {"name": "sgd"})
    with pytest.raises(ConfigError) as excinfo:
        set_learning_rate(optimizer, lr)
    assert_config_error(excinfo, "lr")
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_optax_learning_rate_lives_in_state_and_takes_effect():
    tx = build_optax({"name": "sgd", "lr": 0.1, "momentum": 0.0})
    params = jnp.zeros(3)
    grads = jnp.array([1.0, -2.0, 4.0])
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates, state = update(grads, state, params)
    assert np.allclose(updates, -0.1 * grads)

    state = set_optax_learning_rate(state, 0.01)
    assert state.hyperparams["learning_rate"].dtype == jnp.float32
    updates, state = update(grads, state, params)
    assert np.allclose(updates, -0.01 * grads)

    state.hyperparams["learning_rate"] = jnp.asarray(0.5)  # the raw route an outer loop may take
    updates, state = update(grads, state, params)
    assert np.allclose(updates, -0.5 * grads)


@pytest.mark.parametrize("name", [n for n in OPTIMIZER_NAMES if n != "program"])
def test_optax_state_holds_the_spec_hyperparameters(name):
    state = build_optax({"name": name, "lr": 0.03, "weight_decay": 0.2}).init(jnp.zeros(2))
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.03)
    assert float(state.hyperparams["weight_decay"]) == pytest.approx(0.2)


def test_resolve_optimizer_spec_fills_defaults():
    assert resolve_optimizer_spec({"name": "lion", "betas": [0.95, 0.98]}) == {
        "name": "lion",
        "lr": 1e-3,
        "betas": (0.95, 0.98),
        "weight_decay": 0.0,
    }


BAD_OPTIMIZER_SPECS = [
    ({"name": "adam"}, "optimizer.name"),
    ({}, "optimizer.name"),
    ({"name": "sgd", "betas": (0.9, 0.99)}, "optimizer.betas"),
    ({"name": "lion", "momentum": 0.9}, "optimizer.momentum"),
    ({"name": "adamw", "learning_rate": 0.1}, "optimizer.learning_rate"),
    ({"name": "sgd", "lr": -1e-3}, "optimizer.lr"),
    ({"name": "adamw", "lr": 0}, "optimizer.lr"),
    ({"name": "adamw", "lr": math.nan}, "optimizer.lr"),
    ({"name": "adamw", "betas": (0.9, 1.0)}, "optimizer.betas.1"),
    ({"name": "lion", "betas": (-0.1, 0.99)}, "optimizer.betas.0"),
    ({"name": "lion", "betas": (0.9,)}, "optimizer.betas"),
    ({"name": "adamw", "betas": [0.9, 0.99, 0.999]}, "optimizer.betas"),
    ({"name": "lion", "betas": "0.9,0.99"}, "optimizer.betas"),
    ({"name": "sgd", "momentum": 1.0}, "optimizer.momentum"),
    ({"name": "sgd", "momentum": -0.5}, "optimizer.momentum"),
    ({"name": "sgd", "nesterov": "yes"}, "optimizer.nesterov"),
    ({"name": "sgd", "nesterov": True, "momentum": 0.0}, "optimizer.nesterov"),
    ({"name": "adamw", "eps": 0.0}, "optimizer.eps"),
    ({"name": "adamw", "weight_decay": -0.01}, "optimizer.weight_decay"),
    ({"name": "adamw", "lr": "0.1"}, "optimizer.lr"),
    ({"name": "program"}, "optimizer.program"),
    ({"name": "program", "program": "def broken"}, "optimizer.program"),
    ("adamw", "optimizer"),
]


@pytest.mark.parametrize("builder", ["torch", "optax"])
@pytest.mark.parametrize(("spec", "field"), BAD_OPTIMIZER_SPECS)
def test_optimizer_builders_reject_bad_specs_naming_the_key(builder, spec, field):
    def build():
        if builder == "torch":
            return build_optimizer([torch.zeros(1, requires_grad=True)], spec)
        return build_optax(spec)

    with pytest.raises(ConfigError) as excinfo:
        build()
    assert_config_error(excinfo, field)


@pytest.mark.parametrize("name", ["adamw", "lion"])
@pytest.mark.parametrize("betas", [[0.9], [0.9, 0.99, 0.999], 0.9, "0.9,0.99", []])
def test_betas_of_the_wrong_shape_say_a_pair_is_expected(name, betas):
    with pytest.raises(ConfigError) as excinfo:
        resolve_optimizer_spec({"name": name, "betas": betas})
    assert str(excinfo.value) == f"optimizer.betas: must be a pair [beta1, beta2], each in [0, 1) (got {betas!r})"


def test_unknown_optimizer_name_and_key_list_the_allowed_values():
    with pytest.raises(ConfigError, match="sgd, adamw, lion"):
        build_optimizer([torch.zeros(1)], {"name": "adam"})
    with pytest.raises(ConfigError, match="betas, eps, lr, name, weight_decay"):
        build_optimizer([torch.zeros(1)], {"name": "adamw", "momentum": 0.9})
