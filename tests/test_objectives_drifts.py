"""Drifts (PPO clip, DPO, LPO, TA-LPO) in JAX and their torch export."""

from __future__ import annotations

import functools
import json
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from metaopt.objectives.drifts import (
    DRIFT_NAMES,
    LPO_OFFSET,
    DriftSpec,
    Progress,
    dpo_drift,
    feature_names,
    is_learned,
    make_drift,
    num_features,
    num_params,
    ppo_drift,
)
from metaopt.objectives.export import load_drift, load_torch_drift, save_drift

PROGRESSES = [
    Progress(jnp.float32(0.0), jnp.float32(math.log(10))),
    Progress(jnp.float32(0.1), jnp.float32(math.log(100))),
    Progress(jnp.float32(0.9), jnp.float32(math.log(5000))),
]


def random_params(name: str, seed: int = 0, scale: float = 0.5, **options):
    _, zeros = make_drift(name, **options)
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=v.shape) * scale, jnp.float32) for k, v in zeros.items()}


# Every case: (label, drift name, "zero"/"random" parameters). Each is checked at all PROGRESSES
# (the fixed drifts and LPO must ignore progress; TA-LPO must stay >= 0 and 0 at r == 1 for all).
CASES = [("ppo", "ppo", "zero"), ("dpo", "dpo", "zero")]
CASES += [(f"{n}-{kind}", n, kind) for n in ("lpo", "ta_lpo") for kind in ("zero", "random")]
STACKED_PROGRESS = Progress(*(jnp.stack(values) for values in zip(*PROGRESSES)))


def build(name, params_kind):
    fn, zeros = make_drift(name)
    return fn, (random_params(name) if params_kind == "random" else zeros)


def grid():
    ratios = np.concatenate([np.geomspace(0.01, 5.0, 61), [0.8, 0.9999, 1.0, 1.0001, 1.2]])
    advantages = np.concatenate([np.linspace(-5.0, 5.0, 41), [-1e-3, 1e-3]])
    r, a = np.meshgrid(ratios, advantages, indexing="ij")
    return jnp.asarray(r, jnp.float32), jnp.asarray(a, jnp.float32)


R_EDGE = np.array([0.0, 1e-9, 1e-3, 0.01, 0.5, 1.0 - 1e-6, 1.0, 1.0 + 1e-6, 2.0, 5.0], np.float32)
A_EDGE = np.array([-5.0, -0.3, 0.0, 0.3, 5.0], np.float32)


@functools.partial(jax.jit, static_argnums=0)
@functools.partial(jax.vmap, in_axes=(None, None, 0))  # over the progress values
def evaluate(spec: DriftSpec, params, progress):
    """Values on the grid, on random points, at r == 1, at edge points; d/dr and d/dparams."""
    fn = spec.drift_fn()
    r, a = grid()
    rng = np.random.default_rng(1)
    r_rand = jnp.asarray(rng.uniform(0.01, 5.0, 2000), jnp.float32)
    a_rand = jnp.asarray(rng.uniform(-5.0, 5.0, 2000), jnp.float32)
    # Gradients w.r.t. the ratio at/near r == 1 and for tiny (even 0) ratios; the drift is
    # elementwise, so the gradient of the sum is the per-element derivative.
    r_edge, a_edge = (jnp.asarray(x) for x in np.meshgrid(R_EDGE, A_EDGE, indexing="ij"))
    return (
        fn(params, r, a, progress),
        fn(params, r_rand, a_rand, progress),
        fn(params, jnp.ones_like(a[0]), a[0], progress),
        fn(params, r_edge, a_edge, progress),
        jax.grad(lambda rr: fn(params, rr, a_edge, progress).sum())(r_edge),
        jax.grad(lambda p: fn(p, r_rand, a_rand, progress).sum())(params),
    )


@pytest.mark.parametrize("label,name,params_kind", CASES, ids=[c[0] for c in CASES])
def test_nonnegative_zero_at_one_and_finite_gradients(label, name, params_kind):
    _, params = build(name, params_kind)
    out, out_rand, at_one, edge, grad_r, grad_p = evaluate(DriftSpec.create(name), params, STACKED_PROGRESS)
    r, a = grid()
    assert out.shape == (len(PROGRESSES), *r.shape) and out.dtype == jnp.float32
    for values in (out, out_rand, edge):
        assert bool(jnp.all(jnp.isfinite(values))) and bool(jnp.all(values >= 0.0))
    # Exactly zero at r == 1, for every advantage (including 0 and +-1e-3) and progress.
    assert np.array_equal(np.asarray(at_one), np.zeros((len(PROGRESSES), a.shape[1])))
    assert bool(jnp.all(jnp.isfinite(grad_r)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grad_p))
    if params_kind == "random":
        # (At zero weights the network sits on a saddle: its weight gradients are 0.)
        assert any(bool(jnp.any(g != 0)) for g in jax.tree_util.tree_leaves(grad_p))
    if name != "ta_lpo":  # progress is ignored
        assert np.array_equal(np.asarray(out[0]), np.asarray(out[2]))


def test_ppo_drift_gives_the_clipped_surrogate():
    r, a = grid()
    for eps in (0.1, 0.2, 0.3):
        fn, params = make_drift("ppo", clip_eps=eps)
        surrogate = jnp.minimum(r * a, jnp.clip(r, 1 - eps, 1 + eps) * a)
        np.testing.assert_allclose(r * a - fn(params, r, a), surrogate, rtol=1e-6, atol=1e-6)
    assert np.array_equal(ppo_drift(None, r, a), make_drift("ppo")[0]({}, r, a))


def test_zero_network_is_ppo_up_to_the_offset():
    r, a = grid()
    expected = np.asarray(jax.nn.relu(ppo_drift(None, r, a) - LPO_OFFSET))
    lpo, lpo_zeros = make_drift("lpo")
    assert np.array_equal(np.asarray(lpo(lpo_zeros, r, a)), expected)
    ta_lpo, ta_zeros = make_drift("ta_lpo")
    ta_log, ta_log_zeros = make_drift("ta_lpo", time_inputs="fraction_and_log_horizon")
    for progress in PROGRESSES:
        assert np.array_equal(np.asarray(ta_lpo(ta_zeros, r, a, progress)), expected)
        assert np.array_equal(np.asarray(ta_log(ta_log_zeros, r, a, progress)), expected)
    # Sign of the PPO term: far outside the clip range the drift is (3 - 1.2) * 2 - 1e-4, not 0.
    assert float(lpo(lpo_zeros, 3.0, 2.0)) == pytest.approx(3.6 - LPO_OFFSET, abs=1e-5)
    assert float(lpo(lpo_zeros, 0.5, -2.0)) == pytest.approx(0.6 - LPO_OFFSET, abs=1e-5)


def test_ta_lpo_depends_on_progress_and_lpo_does_not():
    r, a = grid()
    early = Progress(jnp.float32(0.1), jnp.float32(math.log(1000)))
    late = Progress(jnp.float32(0.9), jnp.float32(math.log(1000)))
    fn, _ = make_drift("ta_lpo")
    params = random_params("ta_lpo")
    assert float(jnp.abs(fn(params, r, a, early) - fn(params, r, a, late)).max()) > 1e-2
    other_horizon = Progress(jnp.float32(0.1), jnp.float32(math.log(10)))
    # the paper's [x, (n/N) x] (eq. 10) has no log N; the multi-horizon option reads it
    assert np.array_equal(np.asarray(fn(params, r, a, early)), np.asarray(fn(params, r, a, other_horizon)))
    fn, _ = make_drift("ta_lpo", time_inputs="fraction_and_log_horizon")
    params = random_params("ta_lpo", time_inputs="fraction_and_log_horizon")
    assert float(jnp.abs(fn(params, r, a, early) - fn(params, r, a, other_horizon)).max()) > 1e-2
    fn, _ = make_drift("lpo")
    params = random_params("lpo")
    assert np.array_equal(np.asarray(fn(params, r, a, early)), np.asarray(fn(params, r, a, late)))
    assert np.array_equal(np.asarray(fn(params, r, a, early)), np.asarray(fn(params, r, a)))
    with pytest.raises(ValueError, match=r"ta_lpo.*progress"):
        make_drift("ta_lpo")[0](params, r, a)


def test_dpo_matches_closed_form():
    alpha, beta = 2.0, 0.6
    # Hand-computed: r=2, A=1: (r-1)A = 1, 1 - 2*tanh(0.5) = 0.0757657.
    assert float(dpo_drift(None, 2.0, 1.0)) == pytest.approx(1.0 - 2.0 * math.tanh(0.5), abs=1e-6)
    assert float(dpo_drift(None, 2.0, 1.0)) == pytest.approx(0.0757657, abs=1e-6)
    # r=0.5, A=-1: log(r)A = 0.693147, 0.693147 - 0.6*tanh(0.693147/0.6) = 0.201457.
    x = -math.log(0.5)
    assert float(dpo_drift(None, 0.5, -1.0)) == pytest.approx(x - beta * math.tanh(x / beta), abs=1e-6)
    assert float(dpo_drift(None, 0.5, -1.0)) == pytest.approx(0.201457, abs=1e-5)
    # Improvement directions are free: r=0.5 with A=2 and r=1.5 with A=-2 give 0; so does A=0.
    assert float(dpo_drift(None, 0.5, 2.0)) == 0.0
    assert float(dpo_drift(None, 1.5, -2.0)) == 0.0
    assert float(dpo_drift(None, 3.0, 0.0)) == 0.0
    # Vectorised against a float64 numpy oracle.
    r, a = grid()
    rn, an = np.asarray(r, np.float64), np.asarray(a, np.float64)
    pos, neg = (rn - 1) * an, np.log(rn) * an
    oracle = np.where(
        an >= 0,
        np.maximum(pos - alpha * np.tanh(pos / alpha), 0),
        np.maximum(neg - beta * np.tanh(neg / beta), 0),
    )
    np.testing.assert_allclose(np.asarray(make_drift("dpo")[0]({}, r, a)), oracle, rtol=1e-5, atol=1e-5)


def test_registry_shapes_and_transformations():
    assert DRIFT_NAMES == ("ppo", "dpo", "lpo", "ta_lpo")
    assert [is_learned(n) for n in DRIFT_NAMES] == [False, False, True, True]
    _, lpo = make_drift("lpo")
    _, ta = make_drift("ta_lpo")
    assert {k: v.shape for k, v in lpo.items()} == {"hidden": (8, 128), "out": (128, 1)}
    assert {k: v.shape for k, v in ta.items()} == {"hidden": (16, 128), "out": (128, 1)}
    assert all(v.dtype == jnp.float32 and not v.any() for v in [*lpo.values(), *ta.values()])
    assert num_params(lpo) == 1152 and num_params(ta) == 16 * 128 + 128
    _, ta_log = make_drift("ta_lpo", time_inputs="fraction_and_log_horizon")
    assert ta_log["hidden"].shape == (24, 128) and num_features("ta_lpo", "fraction_and_log_horizon") == 24
    assert num_params(make_drift("lpo", hidden=16)[1]) == 8 * 16 + 16
    assert make_drift("ppo")[1] == {} and make_drift("dpo")[1] == {} and num_params({}) == 0
    assert num_features("lpo") == 8 and len(feature_names("ta_lpo")) == 16
    assert feature_names("ta_lpo")[8:] == tuple(f"fraction*{n}" for n in feature_names("lpo"))

    assert make_drift("lpo", clip_eps=0.3)[0] is make_drift("lpo", clip_eps=0.3)[0]  # one jit cache entry
    spec = DriftSpec.create("dpo", beta=0.5)
    assert spec.as_dict() == {"alpha": 2.0, "beta": 0.5} and hash(spec) == hash(DriftSpec.create("dpo", beta=0.5))

    # jit, vmap over an ES population of parameters, pickle of the drift callable.
    fn, _ = make_drift("ta_lpo", hidden=8)
    rng = np.random.default_rng(0)
    population = {
        "hidden": jnp.asarray(rng.normal(size=(4, 16, 8)), jnp.float32),
        "out": jnp.asarray(rng.normal(size=(4, 8, 1)), jnp.float32),
    }
    r = jnp.asarray(np.exp(rng.normal(size=(3, 5)) * 0.3), jnp.float32)
    a = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    out = jax.jit(jax.vmap(fn, in_axes=(0, None, None, None)))(population, r, a, PROGRESSES[1])
    assert out.shape == (4, 3, 5)
    restored = pickle.loads(pickle.dumps(fn))
    member = jax.tree_util.tree_map(lambda x: x[0], population)
    np.testing.assert_allclose(restored(member, r, a, PROGRESSES[1]), out[0], rtol=1e-6, atol=1e-6)


def test_bad_names_and_options_raise_one_line():
    with pytest.raises(ValueError, match=r"^drift\.name: must be one of ppo, dpo, lpo, ta_lpo; got 'clip'"):
        make_drift("clip")
    with pytest.raises(ValueError, match=r"^ppo\.alpha: unknown key; allowed: clip_eps, name$"):
        make_drift("ppo", alpha=1.0)
    with pytest.raises(ValueError, match=r"^lpo\.clip_eps: Input should be less than 1 \(got 1.5\)"):
        make_drift("lpo", clip_eps=1.5)
    with pytest.raises(ValueError, match=r"^ta_lpo\.hidden: Input should be greater than or equal to 1"):
        make_drift("ta_lpo", hidden=0)
    with pytest.raises(ValueError, match=r"lpo\.hidden"):
        make_drift("lpo", hidden=True)
    with pytest.raises(ValueError, match=r"dpo\.beta"):
        make_drift("dpo", beta=-1.0)
    with pytest.raises(ValueError, match="must be one of"):
        is_learned("LPO")
    for bad_name, bad_options, field in (
        ("foo", {}, r"drift\.name"),
        ("ppo", {"alpha": 1.0}, r"ppo\.alpha"),
        ("dpo", {"alpha": "2"}, r"dpo\.alpha"),
    ):
        with pytest.raises(ValueError, match=rf"^{field}: ") as caught:
            make_drift(bad_name, **bad_options)
        assert "\n" not in str(caught.value)


def torch_inputs(seed: int, n: int = 4096):
    """PPO-like inputs (ratios near 1, normalised advantages) plus the wide [0.01, 5] x [-5, 5] box."""
    rng = np.random.default_rng(seed)
    typical = (np.exp(rng.normal(size=n) * 0.3), rng.normal(size=n))
    wide = (rng.uniform(0.01, 5.0, n), rng.uniform(-5.0, 5.0, n))
    return [tuple(x.astype(np.float32) for x in pair) for pair in (typical, wide)]


@pytest.mark.parametrize("name", [*DRIFT_NAMES, "ta_lpo_log_horizon"])
def test_export_round_trip_jax_and_torch(name, tmp_path):
    options = {"clip_eps": 0.25} if name != "dpo" else {"alpha": 1.5}
    if name == "ta_lpo_log_horizon":
        name, options = "ta_lpo", {**options, "time_inputs": "fraction_and_log_horizon"}
    params = (
        random_params(name, seed=3, **{k: v for k, v in options.items() if k == "time_inputs"})
        if (is_learned(name))
        else {}
    )
    path = save_drift(tmp_path / name, name, params, options)
    document = json.loads((path / "drift.json").read_text())
    assert document["format_version"] == 1 and document["name"] == name
    assert document["options"] == DriftSpec.create(name, **options).as_dict()
    assert document["features"] == list(feature_names(name, options.get("time_inputs", "fraction")))
    assert document["params"] == {k: list(v.shape) for k, v in params.items()}
    with np.load(path / "params.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(params)

    fn = make_drift(name, **options)[0]
    loaded_fn, loaded = load_drift(path)
    module = load_torch_drift(path)
    assert isinstance(module, torch.nn.Module) and list(module.parameters()) == []
    for (r, a), progress in zip(torch_inputs(0) + torch_inputs(1), PROGRESSES + PROGRESSES[:1]):
        expected = np.asarray(fn(params, r, a, progress))
        assert np.array_equal(np.asarray(loaded_fn(loaded, r, a, progress)), expected)
        fraction, log_horizon = float(progress.fraction), float(progress.log_horizon)
        got = module(torch.from_numpy(r), torch.from_numpy(a), fraction, log_horizon)
        assert got.dtype == torch.float32 and got.shape == r.shape
        wide = r.max() > 4.0
        # 1e-5 absolute on PPO-like inputs; on the wide box outputs reach ~20 and XLA's and
        # torch's float32 tanh/log/matmul differ by a few ulp, so allow 2e-6 relative there.
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=2e-6 if wide else 0.0)

    ratio = torch.tensor([0.0, 1e-4, 0.5, 1.0 - 1e-6, 1.0, 1.0 + 1e-6, 3.0], requires_grad=True)
    advantage = torch.tensor([1.0, -2.0, 3.0, -1.0, 2.0, 1.0, -3.0])
    out = module(ratio, advantage, fraction=torch.tensor(0.5), log_horizon=torch.tensor(5.0))
    out.sum().backward()
    assert torch.isfinite(ratio.grad).all() and (out >= 0).all() and out[4] == 0.0

    if name == "ta_lpo":
        with pytest.raises(ValueError, match="ta_lpo: forward needs fraction"):
            module(ratio, advantage)
    if is_learned(name):
        trainable = load_torch_drift(path, trainable=True)
        assert sum(p.numel() for p in trainable.parameters()) == num_params(params)


def test_export_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere: no such drift directory"):
        load_drift(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"drift\.json: missing"):
        load_torch_drift(empty)

    path = save_drift(tmp_path / "lpo", "lpo", random_params("lpo", hidden=4), {"hidden": 4})
    (path / "params.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"params\.npz: missing"):
        load_drift(path)
    np.savez(path / "params.npz", hidden=np.zeros((8, 5), np.float32), out=np.zeros((4, 1), np.float32))
    with pytest.raises(ValueError, match=r"params\.npz: array 'hidden'.*expected float32\[8, 4\]"):
        load_drift(path)
    (path / "params.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"params\.npz: not a readable \.npz"):
        load_drift(path)

    spec = path / "drift.json"
    spec.write_text("{not json")
    with pytest.raises(ValueError, match=r"drift\.json: not valid JSON"):
        load_drift(path)
    good = {"format": "metaopt-drift", "format_version": 1, "name": "ppo", "options": {}, "params": {}}
    spec.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(ValueError, match=r"drift\.json: format_version 99 unsupported"):
        load_drift(path)
    spec.write_text(json.dumps({**good, "name": "trpo"}))
    with pytest.raises(ValueError, match=r"drift\.json: drift\.name: must be one of ppo, dpo, lpo, ta_lpo; got 'trpo'"):
        load_drift(path)
    spec.write_text(json.dumps({**good, "options": {"clip_eps": 2}}))
    with pytest.raises(ValueError, match=r"drift\.json: ppo\.clip_eps"):
        load_drift(path)

    with pytest.raises(ValueError, match=r"params\.hidden: must have shape \[8, 128\]"):
        save_drift(tmp_path / "bad", "lpo", random_params("lpo", hidden=4), {})
    with pytest.raises(ValueError, match="ppo takes keys none"):
        save_drift(tmp_path / "bad", "ppo", random_params("lpo"), {})


def test_pre_time_inputs_ta_lpo_export_fails_with_one_line(tmp_path):
    """A 24-feature ta_lpo export from before the time_inputs option (log N then counted PPO updates) is refused
    with one line; the same weights saved with time_inputs=fraction_and_log_horizon load as that variant."""
    params = random_params("ta_lpo", time_inputs="fraction_and_log_horizon")
    path = save_drift(tmp_path / "new", "ta_lpo", params, {"time_inputs": "fraction_and_log_horizon"})
    spec_file = path / "drift.json"
    document = json.loads(spec_file.read_text())
    assert document["options"]["time_inputs"] == "fraction_and_log_horizon" and len(document["features"]) == 24
    _, loaded = load_drift(path)
    assert loaded["hidden"].shape == (24, 128)
    del document["options"]["time_inputs"]  # what the old code wrote
    spec_file.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"drift\.json: a 24-feature ta_lpo export from before time_inputs") as caught:
        load_drift(path)
    assert "\n" not in str(caught.value)
