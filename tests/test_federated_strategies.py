"""metaopt.federated.strategies: FedAvg, FedOpt (Reddi et al. 2021), FedExP (Jhunjhunwala et al. 2023)
and FedHyper (Wang, Wang, Li, ICLR 2024) against hand-computed values on tiny vectors."""

from __future__ import annotations

import io
import math

import pytest
import torch

from metaopt.errors import ConfigError
from metaopt.federated.strategies import (
    STRATEGIES,
    ClientUpdate,
    FedExp,
    StrategyState,
    cl_beta,
    make_strategy,
    weighted_delta,
)

D = torch.float64
DELTAS = [[0.1, 0.2], [0.3, -0.1], [0.2, 0.2]]  # one client per round, n = 1


def t(values):
    return torch.tensor(values, dtype=D)


def one(delta, n=1, lr=0.01):
    return [ClientUpdate(t(delta), n, lr)]


def run(strategy, rounds, x0=None, n_dim=2):
    x = torch.zeros(n_dim, dtype=D) if x0 is None else x0
    state = strategy.init(x)
    out = []
    for ups in rounds:
        x, state, lr = strategy.aggregate(state, x, ups)
        out.append((x.clone(), state, lr))
    return out


def close(a, b, tol=1e-12):
    assert torch.allclose(a, t(b), atol=tol, rtol=0), (a, b)


# ------------------------------------------------------------------ FedAvg


def test_fedavg_unweighted_mean_by_default_sample_weighting_as_option():
    ups = [ClientUpdate(t([1.0, 0.0]), 1, 0.1), ClientUpdate(t([0.0, 4.0]), 3, 0.1)]
    close(weighted_delta(ups), [0.25, 3.0])
    s = make_strategy("fedavg", server_lr=2.0)  # Δ = (1/K) Σ Δ_i = [0.5, 2] (Reddi et al. Alg. 2)
    x, state, lr = s.aggregate(s.init(t([1.0, 1.0])), t([1.0, 1.0]), ups)
    close(x, [2.0, 5.0])
    assert lr == 0.1 and state.round == 1
    close(state.last_delta, [0.5, 2.0])
    s = make_strategy("fedavg", server_lr=2.0, aggregation="weighted")  # McMahan et al.: n_i / n
    x, state, _ = s.aggregate(s.init(t([1.0, 1.0])), t([1.0, 1.0]), ups)
    close(x, [1.5, 7.0])
    close(state.last_delta, [0.25, 3.0])


def test_fedavg_three_rounds():
    res = run(make_strategy("fedavg"), [one(d) for d in DELTAS])
    close(res[-1][0], [0.6, 0.3])


# ------------------------------------------------------------------ FedOpt


def _fedopt_reference(variant, deltas, eta=1e-2, b1=0.9, b2=0.99, tau=1e-3, v0=1e-6):
    """Scalar re-derivation of Reddi et al. 2021, Alg. 2, per coordinate with math only."""
    x, m, v = 0.0, 0.0, v0
    xs = []
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if variant == "adagrad":
            v = v + d * d
        elif variant == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * (1.0 if v - d * d > 0 else (-1.0 if v - d * d < 0 else 0.0))
        x = x + eta * m / (math.sqrt(v) + tau)
        xs.append(x)
    return xs


@pytest.mark.parametrize("variant", ["adagrad", "adam", "yogi"])
def test_fedopt_three_rounds_match_algorithm_2(variant):
    res = run(make_strategy("fed" + variant), [one(d) for d in DELTAS])
    for k in range(2):
        ref = _fedopt_reference(variant, [d[k] for d in DELTAS])
        for r in range(3):
            assert res[r][0][k].item() == pytest.approx(ref[r], rel=1e-12)


def test_fedadam_one_step_closed_form_beta1_zero():
    # β1 = 0, v_{-1} = 0: x1 = η Δ / (sqrt(1 − β2) |Δ| + τ)
    s = make_strategy("fedadam", beta1=0.0, beta2=0.75, initial_v=0.0, server_lr=0.1, tau=0.01)
    x, state, _ = s.aggregate(s.init(torch.zeros(2, dtype=D)), torch.zeros(2, dtype=D), one([0.4, -2.0]))
    close(x, [0.1 * 0.4 / (0.5 * 0.4 + 0.01), 0.1 * -2.0 / (0.5 * 2.0 + 0.01)])
    close(state.v, [0.25 * 0.16, 0.25 * 4.0])
    # β2 → 1 (v stays at v_{-1} = τ²): step ≈ η (1 − β1) Δ / (2τ)
    s = make_strategy("fedadam", beta1=0.0, beta2=0.999999999, tau=1e-3, server_lr=1e-2)
    x, _, _ = s.aggregate(s.init(torch.zeros(1, dtype=D)), torch.zeros(1, dtype=D), one([1e-4]))
    assert x.item() == pytest.approx(1e-2 * 1e-4 / (2e-3), rel=1e-3)


def test_fedyogi_sign():
    s = make_strategy("fedyogi", initial_v=1.0, beta1=0.0)
    _, st, _ = s.aggregate(s.init(torch.zeros(2, dtype=D)), torch.zeros(2, dtype=D), one([0.5, 2.0]))
    # v > Δ² → v − 0.01 Δ²; v < Δ² → v + 0.01 Δ²
    close(st.v, [1.0 - 0.01 * 0.25, 1.0 + 0.01 * 4.0])


# ------------------------------------------------------------------ FedExP


def test_fedexp_formula_and_lower_bound():
    ups = [ClientUpdate(t(e), 5 * (i + 1), 0.1) for i, e in enumerate([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])]
    # Σ||Δ_i||² = 3, ||Δ̄||² = 1/3, K = 3 → η = 3 / (2·3·1/3) = 1.5 (unweighted despite n_i)
    assert FedExp.server_lr_for(ups) == pytest.approx(1.5)
    s = make_strategy("fedexp")
    x, st, _ = s.aggregate(s.init(torch.zeros(3, dtype=D)), torch.zeros(3, dtype=D), ups)
    close(x, [0.5, 0.5, 0.5])
    assert st.server_lr == pytest.approx(1.5)
    same = [ClientUpdate(t([1.0, 2.0, 3.0]), 1, 0.1)] * 4  # ratio 1/2 → clipped to 1
    assert FedExp.server_lr_for(same) == 1.0
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        rand = [ClientUpdate(torch.randn(4, generator=gen, dtype=D), 1, 0.1) for _ in range(3)]
        eta = FedExp.server_lr_for(rand)
        mean = torch.stack([u.delta for u in rand]).mean(0)
        expect = max(1.0, sum(float(u.delta @ u.delta) for u in rand) / (2 * 3 * float(mean @ mean)))
        assert eta >= 1.0 and eta == pytest.approx(expect)


# ------------------------------------------------------------------ FedHyper


def test_fedhyper_g_three_rounds():
    res = run(make_strategy("fedhyper_g"), [one(d) for d in DELTAS])
    # r1: h = 0 → a = 0, x = d1; r2: h = <d2,d1> = 0.01 → x += 1.01 d2; r3: h = <d3,d2> = 0.04 → a = 0.05
    assert res[0][1].alpha == 0.0 and res[0][1].server_lr == 1.0
    close(res[0][0], [0.1, 0.2])
    assert res[1][1].alpha == pytest.approx(0.01)
    close(res[1][0], [0.403, 0.099])
    assert res[2][1].alpha == pytest.approx(0.05)
    assert res[2][1].server_lr == pytest.approx(1.05)
    close(res[2][0], [0.613, 0.309])


def test_fedhyper_g_alpha_clips():
    s = make_strategy("fedhyper_g")
    res = run(s, [one([10.0, 0.0]), one([10.0, 0.0])])  # h = 100 → a = 4 → lr 5
    assert res[1][1].alpha == 4.0 and res[1][1].server_lr == 5.0
    close(res[1][0], [10.0 + 50.0, 0.0])
    res = run(s, [one([10.0, 0.0]), one([-10.0, 0.0])])  # h = −100 → a = −0.8 → lr 0.2
    assert res[1][1].alpha == -0.8 and res[1][1].server_lr == pytest.approx(0.2)
    close(res[1][0], [10.0 - 2.0, 0.0])


def test_fedhyper_gm_momentum_recursion():
    res = run(make_strategy("fedhyper_gm"), [one(d) for d in DELTAS])
    close(res[0][0], [0.1, 0.2])
    close(res[0][1].m, [0.1, 0.2])
    # r2: h = <d2, m1> = 0.01; x = x1 + 1.01 d2 + 0.9·0.01·m1; m2 = d2 + 0.9 m1
    close(res[1][0], [0.4039, 0.1008])
    close(res[1][1].m, [0.39, 0.08])
    # r3: h = <d3, m2> = 0.094 → a = 0.104; x = x2 + 1.104 d3 + 0.9·0.104·m2
    assert res[2][1].alpha == pytest.approx(0.104)
    close(res[2][0], [0.661204, 0.329088])
    close(res[2][1].m, [0.551, 0.272])
    res = run(make_strategy("fedhyper_gm"), [one([10.0, 0]), one([-10.0, 0])])
    assert res[1][1].alpha == -0.2


def test_fedhyper_sl_lr_and_bounds():
    res = run(make_strategy("fedhyper_sl", lr0=0.01), [one(d) for d in DELTAS])
    assert [r[2] for r in res] == pytest.approx([0.01, 0.0101, 0.0105])
    close(res[-1][0], [0.6, 0.3])  # server is FedAvg
    res = run(make_strategy("fedhyper_sl", lr0=0.01), [one([10.0, 0]), one([10.0, 0])])
    assert res[1][2] == 0.1
    res = run(make_strategy("fedhyper_sl", lr0=0.01), [one([10.0, 0]), one([-10.0, 0])])
    assert res[1][2] == 0.001
    # lr0 defaults to the clients' local lr
    res = run(make_strategy("fedhyper_sl"), [one(DELTAS[0], lr=0.05), one(DELTAS[1], lr=0.05)])
    assert res[1][2] == pytest.approx(0.05 * 1.01)


def test_decay_client_lr():
    res = run(make_strategy("decay", lr0=0.1), [one(d) for d in DELTAS])
    assert [r[2] for r in res] == pytest.approx([0.0995, 0.099002500, 0.0985074875], rel=1e-12)
    close(res[-1][0], [0.6, 0.3])


def test_cl_beta_values_and_bounds():
    # γ = 1 + 0.1·<u,Δ>/(N C) + <u,u_prev> = 1 + 0.1·0.1/5 + 0.02 = 1.022
    assert cl_beta(2.0, t([0.1, 0.0]), t([0.2, 0.0]), t([1.0, 1.0]), 10, 0.5) == pytest.approx(2.044)
    assert cl_beta(1.0, t([0.1, 0.0]), None, None, 10, 0.5) == 1.0
    assert cl_beta(1.0, t([10.0, 0.0]), t([10.0, 0.0]), None, 10, 0.5) == pytest.approx(1.1)  # γ ≤ 1.1
    assert cl_beta(9.5, t([10.0, 0.0]), t([10.0, 0.0]), None, 10, 0.5) == 10.0
    assert cl_beta(1.0, t([10.0, 0.0]), t([-10.0, 0.0]), None, 10, 0.5) == 0.1
    gen = torch.Generator().manual_seed(1)
    beta = 1.0
    for _ in range(50):
        new = cl_beta(
            beta,
            torch.randn(3, generator=gen, dtype=D),
            torch.randn(3, generator=gen, dtype=D),
            torch.randn(3, generator=gen, dtype=D),
            4,
            1.0,
        )
        assert 0.1 <= new <= 10.0 and new <= 1.1 * beta + 1e-12
        beta = new


def test_fedhyper_g_cl_hands_last_delta_to_clients():
    s = make_strategy("fedhyper_g_cl", lr0=0.02, num_clients_total=10, fraction=0.5)
    res = run(s, [one(d) for d in DELTAS])
    close(res[-1][0], [0.613, 0.309])  # server = G
    assert all(r[2] == 0.02 for r in res)
    state = res[0][1]
    close(state.last_delta, DELTAS[0])
    assert s.client_beta(state, 2.0, t([0.1, 0.0]), t([0.2, 0.0])) == pytest.approx(2.0 * (1 + 0.1 * 0.01 / 5 + 0.02))


# ------------------------------------------------------------------ state, registry


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_round_trip_continues_identically(name):
    gen = torch.Generator().manual_seed(2)
    rounds = [
        [ClientUpdate(0.1 * torch.randn(3, generator=gen, dtype=D), 1 + i, 0.01) for i in range(3)] for _ in range(5)
    ]
    s = make_strategy(name)
    x = torch.zeros(3, dtype=D)
    state = s.init(x)
    full = []
    for ups in rounds:
        x, state, lr = s.aggregate(state, x, ups)
        full.append((x, lr))
    x = torch.zeros(3, dtype=D)
    state = s.init(x)
    for ups in rounds[:2]:
        x, state, _ = s.aggregate(state, x, ups)
    buf = io.BytesIO()
    torch.save({"state": state.to_dict(), "x": x}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    state, x = StrategyState.from_dict(loaded["state"]), loaded["x"]
    for r, ups in enumerate(rounds[2:], start=2):
        x, state, lr = s.aggregate(state, x, ups)
        assert torch.equal(x, full[r][0]) and lr == full[r][1]


def test_aggregate_is_pure():
    s = make_strategy("fedhyper_gm")
    x = torch.zeros(2, dtype=D)
    state = s.init(x)
    x1, state1, _ = s.aggregate(state, x, one(DELTAS[0]))
    snapshot = state1.to_dict()
    s.aggregate(state1, x1, one(DELTAS[1]))
    assert state1.to_dict().keys() == snapshot.keys()
    assert torch.equal(state1.m, snapshot["m"]) and state1.alpha == snapshot["alpha"]
    assert torch.equal(x, torch.zeros(2, dtype=D))


def test_registry_errors():
    with pytest.raises(ConfigError) as err:
        make_strategy("fedprox")
    assert "strategy.name: must be one of fedavg" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        make_strategy("fedadam", momentum=0.9)
    assert "beta1" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        make_strategy("fedyogi", variant="adam")  # fixed by the name
    with pytest.raises(ConfigError) as err:
        make_strategy("fedhyper", server="sgd")
    assert "'avg', 'g' or 'gm'" in str(err.value)
    with pytest.raises(ConfigError):
        make_strategy("fedhyper", client_lr="cosine")
    with pytest.raises(ConfigError):
        make_strategy("fedadam", beta2=1.0)
    assert make_strategy("fedhyper", server="gm", client_lr="sl").name == "fedhyper_gm_sl"


def test_constructors_validate_plain_input_and_trust_models():
    """A strategy built from keywords or a plain dict is validated by its options model on the way in; one built
    from a validated model runs it as is. Presets fix FedHyper's rules by name, so they are not options."""
    from metaopt.federated.config import STRATEGY_NAMES, STRATEGY_OPTIONS, FederatedSection
    from metaopt.federated.strategies import FedAvg, FedHyper, FedOpt

    with pytest.raises(ConfigError, match=r"^strategy\.server_lr: Input should be greater than 0"):
        FedAvg({"server_lr": -1.0})
    with pytest.raises(ConfigError, match=r"^strategy\.beta1: Input should be less than 1"):
        FedOpt(beta1=1.0)
    with pytest.raises(ConfigError, match=r"^strategy\.server: unknown key"):
        make_strategy({"name": "fedhyper_g", "server": "gm"})
    with pytest.raises(ConfigError, match=r"^strategy\.sl_bounds: must be a pair \[low, high\] with low <= high"):
        FedHyper(client_lr="sl", sl_bounds=[0.1, 0.001])
    with pytest.raises(TypeError, match="FedAvg runs FedAvgOptions"):
        FedAvg(STRATEGY_OPTIONS.parse({"name": "fedyogi"}))
    assert FedOpt({"name": "fedyogi"}).name == "fedyogi" and FedOpt().name == "fedadam"
    preset = make_strategy(STRATEGY_OPTIONS.parse({"name": "fedhyper_g_cl", "fraction": 0.5}))
    assert preset.name == "fedhyper_g_cl" and preset.options.fraction == 0.5
    assert make_strategy("fedhyper_gm").alpha_bounds == (-0.2, 4.0)
    assert make_strategy("fedhyper", server="gm", alpha_bounds=[-1, 1]).alpha_bounds == (-1.0, 1.0)
    # one list of names: the section accepts exactly what make_strategy builds
    assert STRATEGIES == STRATEGY_NAMES == STRATEGY_OPTIONS.names()
    assert FederatedSection(strategies=list(STRATEGY_NAMES)).strategies == list(STRATEGY_NAMES)


# ------------------------------------------------------------------ end to end


def _simulate(name, lr, rounds=30):
    """4 clients, f_i(x) = ½ Σ_j a_j (x_j − c_ij)², one local SGD step each round."""
    gen = torch.Generator().manual_seed(0)
    a = t([1.0, 0.8, 0.6, 0.5, 0.4])
    c = torch.randn(4, 5, generator=gen, dtype=D)

    def loss(x):
        return float((0.5 * a * (x - c) ** 2).sum(1).mean())

    s = make_strategy(name, lr0=lr)
    x = torch.full((5,), 5.0, dtype=D)
    state, client_lr = s.init(x), lr
    start = loss(x)
    for _ in range(rounds):
        ups = [ClientUpdate(-client_lr * a * (x - c[i]), 10 + i, client_lr) for i in range(4)]
        x, state, client_lr = s.aggregate(state, x, ups)
    return start, loss(x)


def test_end_to_end_quadratic():
    start, end = _simulate("fedavg", 0.5)  # a well-tuned lr converges
    assert end < 0.1 * start
    avg_start, avg_end = _simulate("fedavg", 0.05)  # 10x too small
    g_start, g_end = _simulate("fedhyper_g", 0.05)
    assert avg_end < avg_start and g_end < g_start
    assert g_end <= avg_end


# ------------------------------------------------------------------ issue 23: FedHyper fidelity

UNEQUAL = [ClientUpdate(t([1.0, 0.0]), 1, 0.1), ClientUpdate(t([0.0, 4.0]), 3, 0.1)]


@pytest.mark.parametrize(
    "name", ["fedavg", "fedadam", "fedyogi", "fedadagrad", "fedhyper_g", "fedhyper_gm", "fedhyper_sl", "fedhyper_full"]
)
def test_every_delta_strategy_uses_the_unweighted_mean_unless_told_to_weigh(name):
    for aggregation, want in ((None, [0.5, 2.0]), ("weighted", [0.25, 3.0])):
        s = make_strategy(name, **({} if aggregation is None else {"aggregation": aggregation}))
        _, state, _ = s.aggregate(s.init(t([0.0, 0.0])), t([0.0, 0.0]), UNEQUAL)
        close(state.last_delta, want)


def test_fedadam_steps_along_the_unweighted_mean():
    # Reddi et al. Alg. 2, one round: m = 0.1 Δ, v = 0.99 τ² + 0.01 Δ², x = η m / (√v + τ), Δ = [0.5, 2]
    s = make_strategy("fedadam")
    x, _, _ = s.aggregate(s.init(t([0.0, 0.0])), t([0.0, 0.0]), UNEQUAL)
    want = [1e-2 * 0.1 * d / (math.sqrt(0.99e-6 + 0.01 * d * d) + 1e-3) for d in (0.5, 2.0)]
    close(x, want)


def test_cl_first_previous_change_is_the_last_global_delta_hand_trace():
    # N·C = 10·0.5 = 5, Δ_{t−1} = [1, 0]; the first u_{k−1} is Δ_{t−1}:
    # k=1: γ = min(1.1, 1 + 0.1·0.1/5 + 0.1) = 1.1                   -> β = 1.1
    # k=2: γ = 1 + 0.1·0.2/5 + ⟨[.2,.1],[.1,0]⟩ = 1.024              -> β = 1.1264
    # k=3: γ = 1 + 0.1·(−0.3)/5 + ⟨[−.3,.2],[.2,.1]⟩ = 0.954          -> β = 1.0745856
    last = t([1.0, 0.0])
    us = [t([0.1, 0.0]), t([0.2, 0.1]), t([-0.3, 0.2])]
    beta, prev, betas = 1.0, None, []
    for u in us:
        beta = cl_beta(beta, u, prev, last, 10, 0.5)
        prev = u
        betas.append(beta)
    assert betas == pytest.approx([1.1, 1.1264, 1.0745856], abs=1e-12)
    s = make_strategy("fedhyper_full", num_clients_total=10, fraction=0.5)
    state = StrategyState(last_delta=last)
    assert s.client_beta(state, 1.0, us[0], None) == pytest.approx(1.1)


def test_fedhyper_full_is_gm_with_cl_and_decay_g_is_g_with_decay():
    full = make_strategy("fedhyper_full", lr0=0.02)
    assert (full.server, full.client_lr) == ("gm", "cl")
    gm = make_strategy("fedhyper_gm", lr0=0.02)
    res_full, res_gm = run(full, [one(d) for d in DELTAS]), run(gm, [one(d) for d in DELTAS])
    close(res_full[-1][0], res_gm[-1][0].tolist())  # same server rule
    assert all(r[2] == 0.02 for r in res_full)  # CL: clients get lr0, rescaled per batch on the client
    dg = make_strategy("decay_g", lr0=0.1)
    assert (dg.server, dg.client_lr) == ("g", "decay")
    res = run(dg, [one(d) for d in DELTAS])
    close(res[-1][0], run(make_strategy("fedhyper_g"), [one(d) for d in DELTAS])[-1][0].tolist())
    assert [r[2] for r in res] == pytest.approx([0.1 * 0.995, 0.1 * 0.995**2, 0.1 * 0.995**3])


def test_fedexp_evaluates_the_average_of_its_last_two_iterates():
    s = make_strategy("fedexp")
    x0 = t([1.0, 1.0])
    state = s.init(x0)
    close(s.evaluated(state, x0), [1.0, 1.0])  # before any round: x_0 itself
    ups = [ClientUpdate(t([1.0, 0.0]), 1, 0.1), ClientUpdate(t([-1.0, 0.0]), 1, 0.1)]
    # Δ̄ = 0 -> η_g = 1, x_1 = x_0: average = x_0
    x1, state, _ = s.aggregate(state, x0, ups)
    close(s.evaluated(state, x1), [1.0, 1.0])
    ups = [ClientUpdate(t([2.0, 0.0]), 1, 0.1), ClientUpdate(t([0.0, 2.0]), 1, 0.1)]
    # Δ̄ = [1, 1], Σ‖Δ_i‖² = 8, η_g = max(1, 8 / (2·2·2)) = 1: x_2 = [2, 2]; evaluated (x_1 + x_2)/2 = [1.5, 1.5]
    x2, state, _ = s.aggregate(state, x1, ups)
    close(x2, [2.0, 2.0])
    close(s.evaluated(state, x2), [1.5, 1.5])
    plain = make_strategy("fedexp", average_last_two=False)
    close(plain.evaluated(state, x2), [2.0, 2.0])
    assert make_strategy("fedavg").evaluated(state, x2) is x2


def test_fedexp_evaluates_the_midpoint_of_an_extrapolated_step():
    # Jhunjhunwala et al. 2023, eq. (9) and Sec. 4, with η_g > 1 so that x_t, x_{t+1} and x_t + Δ̄ all differ:
    # Δ_1 = [2, 0], Δ_2 = [−1, 0] -> Δ̄ = [0.5, 0], η_g = max(1, (4 + 1) / (2·2·0.25)) = 5
    # x_1 = x_0 + 5Δ̄ = [2.5, 0] (training goes on from here), evaluated (x_0 + x_1) / 2 = [1.25, 0]
    s = make_strategy("fedexp")
    x0 = t([0.0, 0.0])
    ups = [ClientUpdate(t([2.0, 0.0]), 1, 0.1), ClientUpdate(t([-1.0, 0.0]), 1, 0.1)]
    assert FedExp.server_lr_for(ups) == pytest.approx(5.0, abs=1e-12)
    x1, state, _ = s.aggregate(s.init(x0), x0, ups)
    assert state.server_lr == pytest.approx(5.0, abs=1e-12)
    close(x1, [2.5, 0.0])
    close(s.evaluated(state, x1), [1.25, 0.0])
    # round 2 the same on the other axis: x_2 = [2.5, 2.5], evaluated (x_1 + x_2) / 2 = [2.5, 1.25], not (x_0 + x_2) / 2
    ups = [ClientUpdate(t([0.0, 2.0]), 1, 0.1), ClientUpdate(t([0.0, -1.0]), 1, 0.1)]
    x2, state, _ = s.aggregate(state, x1, ups)
    close(x2, [2.5, 2.5])
    close(s.evaluated(state, x2), [2.5, 1.25])
