"""metaopt.symbolic: program text, interpreter, export (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms"), with pytorch_optimizer, optax and numpy as oracles."""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from pytorch_optimizer import Lion

from metaopt.symbolic.export import ProgramOptimizer, program_optax
from metaopt.symbolic.interpreter import run_program
from metaopt.symbolic.program import (
    INPUT_TYPES,
    NAMED_CONSTANTS,
    PRIMITIVES,
    SCALAR,
    UNARY_MATH,
    Const,
    Program,
    Statement,
    Var,
    adamw_program,
    lion_program,
    result_type,
)
from metaopt.symbolic.text import ProgramSyntaxError, check_program, format_program, parse_program

HEADER = "def train(w, g, m, v, lr):"
RETURN = "    return update, m, v"


def program_text(*body: str) -> str:
    return "\n".join([HEADER, *("    " + line for line in body), RETURN])


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 5, generator=gen), torch.randn(32, 3, generator=gen)) for _ in range(n)]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    x, y = batch
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def at_step(step: int):
    """An ``assert_close`` message: torch's own, prefixed with the step at which the two optimizers parted."""
    return lambda message: f"step {step}: {message}"


# ---- torch export vs references ---------------------------------------------------------------------------


def test_lion_program_matches_pytorch_optimizer_lion():
    lr, wd = 3e-3, 0.5
    reference_model = mlp()
    program_model = copy.deepcopy(reference_model)
    reference = Lion(reference_model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=wd)
    optimizer = ProgramOptimizer(
        program_model.parameters(), lion_program(beta1=0.9, beta2=0.99, weight_decay=wd), lr=lr
    )
    data = batches(100)

    # first step from m = 0: w1 = w0 * (1 - lr * wd) - lr * sign(g1)
    w0 = params_of(program_model)
    train_step(program_model, optimizer, data[0])
    grads = [p.grad.clone() for p in program_model.parameters()]
    for w, g, p in zip(w0, grads, program_model.parameters()):
        torch.testing.assert_close(p.detach(), w * (1 - lr * wd) - lr * torch.sign(g), rtol=1e-6, atol=1e-7)
    train_step(reference_model, reference, data[0])

    for step, batch in enumerate(data[1:], start=2):
        train_step(reference_model, reference, batch)
        train_step(program_model, optimizer, batch)
        for a, b in zip(reference_model.parameters(), program_model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=at_step(step))
    assert optimizer.last_finite and optimizer.nonfinite_steps == 0


def test_adamw_program_matches_reference_without_bias_correction_or_eps():
    lr = 0.5  # the program scales lr by 0.001
    model = mlp(2)
    reference_params = params_of(model)
    optimizer = ProgramOptimizer(model.parameters(), adamw_program(), lr=lr)
    m = [torch.zeros_like(p) for p in reference_params]
    v = [torch.zeros_like(p) for p in reference_params]
    gen = torch.Generator().manual_seed(3)
    for step in range(100):
        grads = [torch.randn(p.shape, generator=gen) + 0.05 for p in reference_params]
        assert all(bool((g != 0).all()) for g in grads)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        optimizer.step()
        for i, (w, g) in enumerate(zip(reference_params, grads)):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            reference_params[i] = w - lr * 0.001 * (m[i] / torch.sqrt(v[i]) + 0.01 * w)
        for a, b in zip(reference_params, model.parameters()):
            torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-6, msg=at_step(step))


def test_nonfinite_guard():
    program = parse_program(program_text("z = g * 0.0", "r = reciprocal(z)", "update = r * lr", "m = g / z"))
    model = mlp()
    before = params_of(model)
    optimizer = ProgramOptimizer(model.parameters(), program, lr=0.1)
    for batch in batches(3):
        train_step(model, optimizer, batch)
        assert optimizer.last_finite is False
    assert optimizer.nonfinite_steps == 3
    for p, w in zip(model.parameters(), before):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), w)  # every update entry was inf -> replaced by 0
    assert all(torch.isfinite(optimizer.state[p]["m"]).all() for p in model.parameters())

    # only the non-finite entries are zeroed
    g = torch.tensor([0.0, 2.0, -4.0])
    result = run_program(
        parse_program(program_text("update = reciprocal(g)")),
        [torch.zeros(3)],
        [g],
        [torch.zeros(3)],
        [torch.zeros(3)],
        1.0,
    )
    assert result.finite is False
    torch.testing.assert_close(result.updates[0], torch.tensor([0.0, 0.5, -0.25]))
    ok = run_program(
        parse_program(program_text("update = g * lr")),
        [torch.zeros(3)],
        [g],
        [torch.zeros(3)],
        [torch.zeros(3)],
        torch.tensor(2.0),
    )
    assert ok.finite is True
    torch.testing.assert_close(ok.updates[0], 2 * g)


# ---- primitive semantics vs numpy (torch and jax backends) ------------------------------------------------

SHAPES = [(4, 3), (3,), (2, 2, 2)]


def three_tensors(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]


def run_both(body: list[str], w, g, m, v, lr=0.7) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``update`` of a program from the torch interpreter and from program_optax (which returns -update)."""
    program = parse_program(program_text(*body))
    result = run_program(
        program,
        [torch.tensor(x) for x in w],
        [torch.tensor(x) for x in g],
        [torch.tensor(x) for x in m],
        [torch.tensor(x) for x in v],
        lr,
    )
    transform = program_optax(program, lr)
    params = [jnp.asarray(x) for x in w]
    state = transform.init(params)._replace(m=[jnp.asarray(x) for x in m], v=[jnp.asarray(x) for x in v])
    updates, _ = transform.update([jnp.asarray(x) for x in g], state, params)
    return [u.numpy() for u in result.updates], [-np.asarray(u) for u in updates]


def check(body: list[str], expected: list[np.ndarray], w, g, m=None, v=None, rtol=1e-5):
    m = m if m is not None else [np.zeros_like(x) for x in w]
    v = v if v is not None else [np.zeros_like(x) for x in w]
    torch_out, jax_out = run_both(body, w, g, m, v)
    for t, j, e, shape in zip(torch_out, jax_out, expected, SHAPES):
        e = np.nan_to_num(np.broadcast_to(np.asarray(e, np.float32), shape), nan=0.0, posinf=0.0, neginf=0.0)
        np.testing.assert_allclose(t, e, rtol=rtol, atol=1e-6, err_msg=f"torch {body}")
        np.testing.assert_allclose(j, e, rtol=rtol, atol=1e-6, err_msg=f"jax {body}")


def test_global_primitives_match_numpy():
    w, g, m = three_tensors(0), three_tensors(1), three_tensors(2)
    global_norm = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g))
    check(["n = global_norm(g)", "update = n * 1.0"], [np.full(s, global_norm) for s in SHAPES], w, g)
    check(["update = norm(g)"], [np.linalg.norm(x.ravel()) for x in g], w, g)
    check(["update = dot(g, m)"], [np.sum(a * b) for a, b in zip(g, m)], w, g, m)
    cos = [np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(g, m)]
    check(["update = cosine_sim(g, m)"], cos, w, g, m)
    check(["update = cosine_sim(g, m)"], [0.0, 0.0, 0.0], w, g, [np.zeros_like(x) for x in g])  # zero norm
    for c in (0.5, -0.5, 100.0):
        scale = min(1.0, abs(c) / global_norm)
        check([f"update = clip_by_global_norm(g, {c!r})"], [x * scale for x in g], w, g)
    # the clip threshold may be a per-tensor scalar
    check(
        ["c = norm(w)", "update = clip_by_global_norm(g, c)"],
        [x * min(1.0, np.linalg.norm(wi) / global_norm) for x, wi in zip(g, w)],
        w,
        g,
    )
    check(["update = clip(g, -0.3)"], [np.clip(x, -0.3, 0.3) for x in g], w, g)
    check(["update = interp(g, m, 0.25)"], [0.75 * a + 0.25 * b for a, b in zip(g, m)], w, g, m)
    check(["update = interp(g, m, lr)"], [0.3 * a + 0.7 * b for a, b in zip(g, m)], w, g, m)


def test_elementwise_primitives_match_numpy():
    w, g, m = three_tensors(3), three_tensors(4), three_tensors(5)
    g = [x * 0.9 for x in g]
    reference = {
        "abs": np.abs,
        "cos": np.cos,
        "sin": np.sin,
        "tan": np.tan,
        "arcsin": np.arcsin,
        "arccos": np.arccos,
        "arctan": np.arctan,
        "sinh": np.sinh,
        "cosh": np.cosh,
        "tanh": np.tanh,
        "arcsinh": np.arcsinh,
        "arccosh": np.arccosh,
        "arctanh": np.arctanh,
        "exp": np.exp,
        "exp2": lambda x: 2.0**x,
        "exp10": lambda x: 10.0**x,
        "expm1": np.expm1,
        "log": lambda x: np.log(np.abs(x)),
        "log10": lambda x: np.log10(np.abs(x)),
        "log2": lambda x: np.log2(np.abs(x)),
        "sqrt": lambda x: np.sqrt(np.abs(x)),
        "log1p": np.log1p,
        "square": np.square,
        "cube": lambda x: x**3,
        "cbrt": np.cbrt,
        "sign": np.sign,
        "reciprocal": lambda x: 1.0 / x,
        "negative": np.negative,
    }
    assert set(reference) == set(UNARY_MATH)
    with np.errstate(all="ignore"):
        for op, fn in reference.items():
            check([f"update = {op}(g)"], [fn(x.astype(np.float64)) for x in g], w, g)
        binary = {
            "add": np.add,
            "sub": np.subtract,
            "mul": np.multiply,
            "div": np.divide,
            "max": np.maximum,
            "min": np.minimum,
            "power": np.power,
        }
        for op, fn in binary.items():
            check([f"update = {op}(g, m)"], [fn(a.astype(np.float64), b) for a, b in zip(g, m)], w, g, m)
            check([f"update = {op}(g, 0.5)"], [fn(a.astype(np.float64), 0.5) for a in g], w, g)
        check(["update = power(2.0, g)"], [2.0 ** a.astype(np.float64) for a in g], w, g)
        check(["update = power(g, 2.0)"], [a**2 for a in g], w, g)


# ---- optax export vs optax.lion ---------------------------------------------------------------------------


def test_program_optax_matches_optax_lion():
    lr, wd = 3e-3, 0.5
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "w1": jax.random.normal(k1, (5, 16)) * 0.4,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k2, (16, 3)) * 0.25,
        "b2": jnp.zeros(3),
    }
    xs = jax.random.normal(k3, (100, 32, 5))
    ys = jnp.sin(xs[..., :3] * 2.0)

    def loss(p, x, y):
        return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)

    def make_step(transform):
        @jax.jit
        def step(p, state, x, y):
            updates, state = transform.update(jax.grad(loss)(p, x, y), state, p)
            return optax.apply_updates(p, updates), state

        return step

    reference_tx = optax.lion(lr, b1=0.9, b2=0.99, weight_decay=wd)
    program_tx = program_optax(lion_program(beta1=0.9, beta2=0.99, weight_decay=wd), lr)
    ref_step, prog_step = make_step(reference_tx), make_step(program_tx)
    ref_params, ref_state = params, reference_tx.init(params)
    prog_params, prog_state = params, program_tx.init(params)
    for i in range(100):
        ref_params, ref_state = ref_step(ref_params, ref_state, xs[i], ys[i])
        prog_params, prog_state = prog_step(prog_params, prog_state, xs[i], ys[i])
        for name in params:
            np.testing.assert_allclose(
                prog_params[name], ref_params[name], rtol=1e-6, atol=1e-7, err_msg=f"step {i + 1} {name}"
            )
    assert int(prog_state.count) == 100 and int(prog_state.nonfinite_steps) == 0

    # a schedule works too
    scheduled = program_optax(lion_program(), optax.linear_schedule(1e-3, 0.0, 10))
    state = scheduled.init(params)
    grads = jax.grad(loss)(params, xs[0], ys[0])
    updates, state = scheduled.update(grads, state, params)
    np.testing.assert_allclose(updates["w1"], -1e-3 * np.sign(0.1 * grads["w1"]), rtol=1e-6)
    # non-finite outputs are zeroed and counted
    bad = program_optax(parse_program(program_text("update = reciprocal(m)")), 1.0)
    updates, state = bad.update(grads, bad.init(params), params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates)) and int(state.nonfinite_steps) == 1


# ---- text ---------------------------------------------------------------------------------------------------

VAR_POOL = ("m", "v", "update", "lr", "a", "b", "tmp", "x1")


def random_const(rng: np.random.Generator) -> Const:
    kind = rng.integers(5)
    if kind == 0:
        name = str(rng.choice(list(NAMED_CONSTANTS)))
        return Const(NAMED_CONSTANTS[name], name)
    if kind == 1:
        return Const(float(rng.integers(-5, 6)))
    if kind == 2:
        return Const(float(rng.choice([1e-300, -1e300, 1e-8, -0.0, 0.1, 1 / 3])))
    return Const(float(rng.normal() * 10.0 ** rng.integers(-9, 9)))


def random_program(rng: np.random.Generator) -> Program:
    types = dict(INPUT_TYPES)
    statements = []
    n = int(rng.integers(1, 12))
    for index in range(n):
        while True:
            op = str(rng.choice(list(PRIMITIVES)))
            args = [
                random_const(rng) if rng.random() < 0.3 else Var(str(rng.choice(list(types))))
                for _ in range(PRIMITIVES[op].arity)
            ]
            kind = result_type(op, [SCALAR if isinstance(a, Const) else types[a.name] for a in args])
            if kind is not None:
                break
        target = "update" if index == n - 1 else str(rng.choice(VAR_POOL))
        statements.append(Statement(target, op, tuple(args)))
        types[target] = kind
    return Program(tuple(statements))


def test_text_round_trip():
    for program in (adamw_program(), lion_program(), lion_program(0.95, 0.98, 1.5)):
        assert parse_program(format_program(program)) == program
    assert format_program(lion_program()).splitlines()[0] == HEADER
    assert "    update = u * lr" in format_program(lion_program()).splitlines()
    rng = np.random.default_rng(0)
    for _ in range(50):
        program = random_program(rng)
        check_program(program)
        text = format_program(program)
        assert parse_program(text) == program, text
        assert format_program(parse_program(text)) == text


def test_parse_accepts_comments_blank_lines_literals_and_constants():
    text = """
# Lion-like, written by hand
def train(w, g, m, v, lr):   # header comment

    lr = lr * 0.001          # the AdamW program rescales lr too
    c = interp(g, m, 9e-1)
    d = c * -1e-3
    e2 = d - -2.5E+2
    s = sign(c)
    s = s * pi
    update = s * lr
    v = max(v, eps)
    return update, m, v
"""
    program = parse_program(text)
    assert program.statements[0] == Statement("lr", "mul", (Var("lr"), Const(0.001)))
    assert program.statements[1].args[2] == Const(0.9)
    assert program.statements[2] == Statement("d", "mul", (Var("c"), Const(-1e-3)))
    assert program.statements[3] == Statement("e2", "sub", (Var("d"), Const(-250.0)))
    assert program.statements[5].args[1] == Const(math.pi, "pi")
    assert program.statements[7].args[1] == Const(1e-8, "eps")
    assert parse_program(format_program(program)) == program
    # non-finite constants have a text form
    weird = Program((Statement("update", "mul", (Var("g"), Const(float("-inf")))),))
    assert parse_program(format_program(weird)) == weird


MALFORMED = [
    # (text, line, words the message must contain)
    ("    update = g * lr\n    return update, m, v", 1, ["def train(w, g, m, v, lr):"]),
    ("def train(w, g, m, lr):\n    update = g * lr\n    return update, m, v", 1, ["(w, g, m, v, lr)"]),
    ("def step(w, g, m, v, lr):\n    update = g\n    return update, m, v", 1, ["'train'"]),
    (program_text("update = g * lr")[: -len(RETURN) - 1], 2, ["missing", "return update, m, v"]),
    (program_text("update = g * lr").replace("update, m, v", "update, v, m"), 3, ["return update, m, v"]),
    (program_text("x = sqr(g)", "update = x * lr"), 2, ["unknown primitive 'sqr'", "sqrt", "square"]),
    (program_text("x = interp(g, m)", "update = x * lr"), 2, ["interp takes 3 arguments, got 2"]),
    (program_text("x = g % 2", "update = x * lr"), 2, ["unexpected character '%'"]),
    (program_text("x = g * 2", "update = q * lr"), 3, ["'q'", "before it is assigned"]),
    (program_text("update = x1 * lr", "x1 = g * 2"), 2, ["'x1'", "before it is assigned"]),
    (HEADER + "\n\n    # nothing\n" + RETURN, 4, ["empty"]),
    (program_text("x = g * 2 + 1", "update = x * lr"), 2, ["one operation per statement"]),
    (program_text("x = sqrt(square(g))", "update = x * lr"), 2, ["one operation per statement"]),
    (program_text("x = g ** 2", "update = x * lr"), 2, ["power(x, y)"]),
    (program_text("x = g * 1e", "update = x * lr"), 2, ["malformed number '1e'"]),
    (program_text("x = g * 1.2.3", "update = x * lr"), 2, ["malformed number"]),
    (program_text("pi = g * 2", "update = g * lr"), 2, ["constant 'pi'"]),
    (program_text("x = norm(lr)", "update = g * x"), 2, ["norm(scalar)"]),
    (program_text("x = g * 2"), 3, ["'update'", "never assigned"]),
    (program_text("x = -g * 2", "update = x * lr"), 2, ["negative(x)"]),
    (program_text("x g", "update = g * lr"), 2, ["expected '='"]),
    (program_text("x = g", "update = g * lr"), 2, ["expected an operation"]),
    (program_text("update = g * lr") + "\n    x = g * 2", 4, ["after the return"]),
    ("# header below\n\n" + program_text("update = g * lr", "x = clip(g)"), 5, ["clip takes 2 arguments, got 1"]),
    (program_text("update = g * lr", "x = max(g, m,)"), 3, ["expected an argument"]),
]


@pytest.mark.parametrize("text,line,words", MALFORMED)
def test_malformed_text_raises_with_line(text, line, words):
    with pytest.raises(ProgramSyntaxError) as info:
        parse_program(text)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.line == line, str(error)
    assert str(error) == f"line {line}: {error.message}"
    for word in words:
        assert word in error.message, error.message


def test_check_program_on_data():
    with pytest.raises(ProgramSyntaxError, match=r"line 3: .*'nope'"):
        check_program(
            Program((Statement("x", "sign", (Var("g"),)), Statement("update", "mul", (Var("nope"), Var("x")))))
        )
    with pytest.raises(ValueError, match="unknown primitive 'frobnicate'"):
        run_program(
            Program((Statement("update", "frobnicate", (Var("g"),)),)),
            [torch.zeros(2)],
            [torch.zeros(2)],
            [torch.zeros(2)],
            [torch.zeros(2)],
            0.1,
        )


# ---- JSON and checkpoints ---------------------------------------------------------------------------------


def test_json_round_trip():
    rng = np.random.default_rng(1)
    for program in [adamw_program(), lion_program(), *(random_program(rng) for _ in range(20))]:
        assert Program.from_json(program.to_json()) == program


def test_program_optimizer_state_dict_round_trip():
    data = batches(10, seed=5)
    program = adamw_program()
    model = mlp(4)
    start = copy.deepcopy(model)
    optimizer = ProgramOptimizer(model.parameters(), program, lr=0.3)
    for batch in data[:5]:
        train_step(model, optimizer, batch)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    for batch in data[5:]:
        train_step(model, optimizer, batch)

    restored = copy.deepcopy(start)
    restored.load_state_dict(checkpoint["model"])
    # a fresh optimizer built with another program and lr: the checkpoint restores both
    fresh = ProgramOptimizer(restored.parameters(), lion_program(), lr=1.0)
    fresh.load_state_dict(checkpoint["optimizer"])
    assert fresh.program == program and fresh.param_groups[0]["lr"] == 0.3
    for batch in data[5:]:
        train_step(restored, fresh, batch)
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(optimizer.state[a]["m"], fresh.state[b]["m"])
        assert torch.equal(optimizer.state[a]["v"], fresh.state[b]["v"])

    # lr lives in the param groups (schedules / PBT change it); a group may carry its own program (even as text)
    layers = mlp(6)
    two = ProgramOptimizer(
        [
            {"params": layers[0].parameters()},
            {"params": layers[2].parameters(), "program": format_program(lion_program()), "lr": 0.01},
        ],
        adamw_program(),
        lr=0.1,
    )
    assert Program.from_json(two.param_groups[1]["program"]) == lion_program()
    before = params_of(layers)
    two.param_groups[0]["lr"] = 0.0
    train_step(layers, two, data[0])
    after = params_of(layers)
    assert torch.equal(before[0], after[0]) and not torch.equal(before[2], after[2])
