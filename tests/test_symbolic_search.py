"""Symbolic optimizer search end to end: the tiny LM proxy, programs as metaopt optimizers, regularized
evolution (ageing, tournaments, hash cache, restarts), bit-identical resume, and the Tune + Ray + MLflow run
with its funnel and simplification."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import EXPERIMENTS, KillTrialProcess, assert_runs_finished
from metaopt import config, tracking
from metaopt.optim import build_optimizer, set_learning_rate
from metaopt.symbolic.program import lion_program
from metaopt.symbolic.proxies import LocalScorer
from metaopt.symbolic.search import (
    SearchState,
    init_search,
    iterations_for,
    load_start_program,
    search_step,
)
from metaopt.tasks import build_task


def load_tiny(tmp_path: Path, *overrides: str):
    base = [f"ray.storage_path={tmp_path / 'ray_results'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    return config.load(EXPERIMENTS / "symbolic_tiny.yaml", [*base, *overrides])


def test_tiny_lm_learns_and_resumes_exactly():
    task = build_task("tiny_lm", {"seq_len": 16, "d_model": 16}, {"name": "adamw", "lr": 3e-3}, seed=0)
    before = task.evaluate("val")["val_accuracy"]
    task.train(150, lambda _s: 3e-3)
    state = task.state()
    after = task.train(50, lambda _s: 3e-3)
    assert after["val_accuracy"] > before + 0.05, (before, after)
    again = build_task("tiny_lm", {"seq_len": 16, "d_model": 16}, {"name": "adamw", "lr": 3e-3}, seed=1)
    again.restore(state)
    assert again.train(50, lambda _s: 3e-3) == after


def test_program_optimizer_is_a_metaopt_optimizer_choice():
    """A program (here Lion, as text) in an optimizer spec trains like pytorch-optimizer's Lion."""
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    from metaopt.symbolic.text import format_program

    ours = build_optimizer(
        a.parameters(), {"name": "program", "program": format_program(lion_program(weight_decay=0.1)), "lr": 1e-2}
    )
    reference = build_optimizer(b.parameters(), {"name": "lion", "lr": 1e-2, "weight_decay": 0.1})
    x, y = torch.randn(64, 5), torch.randn(64, 3)
    for step in range(30):
        if step == 15:  # the outer loop changes the lr without rebuilding the optimizer
            set_learning_rate(ours, 3e-3)
            set_learning_rate(reference, 3e-3)
        for model, opt in ((a, ours), (b, reference)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_malformed_start_program_names_its_line(tmp_path):
    from metaopt.errors import ConfigError

    path = tmp_path / "bad.txt"
    path.write_text(
        "def train(w, g, m, v, lr):\n    m = interp(g, m, 0.9)\n    update = frobnicate(m)\n    return update, m, v\n"
    )
    with pytest.raises(ConfigError, match="line 3"):
        load_start_program(str(path))


@pytest.fixture(scope="module")
def direct_search(tmp_path_factory):
    """The tiny search run directly in this process: every iteration's state, as JSON."""
    exp = load_tiny(tmp_path_factory.mktemp("direct"))
    scorer = LocalScorer()
    state = init_search(exp.section, seed=0, scorer=scorer)
    snapshots = [state.to_json()]
    for _ in range(iterations_for(exp.section)):
        state = search_step(state, exp.section, scorer)
        snapshots.append(state.to_json())
    return {"exp": exp, "state": state, "snapshots": snapshots}


def test_regularized_evolution_ages_out_and_counts(direct_search):
    exp, state = direct_search["exp"], direct_search["state"]
    section = exp.section
    assert len(state.history) == 1 + iterations_for(section) * section.batch
    assert len(state.population) == min(section.population, len(state.history))
    # regularized evolution removes the oldest: the survivors are the youngest programs, in order
    assert [s.index for s in state.population] == [s.index for s in state.history[-section.population :]]
    assert state.start.score > 0.3 and math.isfinite(state.start.score)
    assert state.best.score >= state.start.score
    assert all(s.parent is not None and s.parent < s.index for s in state.history[1:])
    hashes = {s.hash for s in state.history}
    assert state.cache_hits == len(state.history) - len(hashes)  # a repeated function is never re-trained


def test_search_resumes_from_json_identically(direct_search):
    exp, snapshots = direct_search["exp"], direct_search["snapshots"]
    state = SearchState.from_json(snapshots[1])
    for _ in range(iterations_for(exp.section) - 1):
        state = search_step(state, exp.section, LocalScorer())
    assert state.to_json() == snapshots[-1]


class HashScorer:
    """A stand-in for the proxy: a program's score is a fixed pseudo-random number drawn from its functional hash
    (instant, deterministic), so the restart tests see improvements and plateaus without training anything."""

    def __init__(self):
        self.scored = 0

    def score(self, programs, proxy):
        from metaopt.symbolic.analysis import functional_hash
        from metaopt.symbolic.proxies import ProgramScore

        self.scored += len(programs)
        return [ProgramScore(int(functional_hash(p)[:8], 16) / 16**8, 1.0, (1.0,)) for p in programs]


def test_restarts_reseed_the_whole_population_from_start_or_best(tmp_path):
    """Chen et al. 2023, Sec. 2: every ``restart_every`` iterations the population restarts from the start program
    (exploration); after ``restart_after`` iterations without a new best, from the best (exploitation). A restart
    replaces every member with a mutant; the best so far is never lost; each kind is counted."""
    from metaopt.symbolic.search import search_metrics

    exp = load_tiny(
        tmp_path,
        "symbolic.restart_every=5",
        "symbolic.restart_after=2",
        "symbolic.population=6",
        "symbolic.batch=2",
        "symbolic.evaluations=500",
    )
    section, scorer = exp.section, HashScorer()
    state = init_search(section, seed=3, scorer=scorer)
    kinds, best_scores, snapshots = [], [state.best.score], [state.to_json()]
    for _ in range(20):
        seen, best, old = len(state.history), state.best.index, {s.index for s in state.population}
        # the paper's rule, written out: periodic first, else the plateau
        due = (
            "restart_start"
            if (state.iteration + 1) % 5 == 0
            else "restart_best"
            if state.since_best >= 2
            else "tournament"
        )
        state = search_step(state, section, scorer)
        kinds.append(due)
        best_scores.append(state.best.score)
        snapshots.append(state.to_json())
        if due == "tournament":
            assert len(state.history) == seen + section.batch
            assert {s.origin for s in state.history[seen:]} == {"tournament"}
            assert old & {s.index for s in state.population}  # ageing, not a reseed
            continue
        parent = 0 if due == "restart_start" else best
        assert len(state.history) == seen + section.population
        assert [s.index for s in state.population] == list(range(seen, seen + section.population))  # all new
        assert all((s.origin, s.parent) == (due, parent) for s in state.population)
    assert best_scores == sorted(best_scores)  # a restart never loses the best so far
    assert state.best.score == max(s.score for s in state.history)
    assert state.restarts_start == kinds.count("restart_start") == 4
    assert state.restarts_best == kinds.count("restart_best") >= 1
    metrics = search_metrics(state)
    assert (metrics["restarts_start"], metrics["restarts_best"]) == (state.restarts_start, state.restarts_best)
    assert metrics["restarts"] == state.restarts_start + state.restarts_best
    assert state.cache_hits == len(state.history) - len({s.hash for s in state.history})
    assert scorer.scored == len({s.hash for s in state.history})  # restarts still go through the hash cache

    # a checkpoint taken mid-search resumes identically through the restarts that follow
    resumed = SearchState.from_json(snapshots[12])
    for _ in range(20 - 12):
        resumed = search_step(resumed, section, HashScorer())
    assert resumed.to_json() == snapshots[-1]


def test_restarts_spend_the_evaluation_budget_sooner(tmp_path):
    from metaopt.symbolic.search import search_done

    exp = load_tiny(
        tmp_path, "symbolic.restart_every=2", "symbolic.population=6", "symbolic.batch=2", "symbolic.evaluations=15"
    )
    state = init_search(exp.section, seed=0, scorer=HashScorer())
    while not search_done(state, exp.section):
        state = search_step(state, exp.section, HashScorer())
    assert state.iteration < iterations_for(exp.section) == 7
    assert len(state.history) == 1 + 2 + 6 + 2 + 6 >= 15  # tournament, restart, tournament, restart


def test_removed_restart_probability_is_one_config_error(tmp_path):
    from metaopt.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_tiny(tmp_path, "symbolic.restart_from_start_probability=0.5")
    message = str(err.value)
    assert "\n" not in message and message.startswith("symbolic.restart_from_start_probability: removed")
    assert "restart_every" in message and "restart_after" in message


def test_killed_search_trial_resumes_and_matches_the_direct_run(ray_session, tmp_path, direct_search):
    from metaopt.symbolic.sweep import run_search

    exp = load_tiny(tmp_path, "symbolic.checkpoint_every=1", "symbolic.max_failures=2")
    killer = KillTrialProcess(at_iteration=1)
    (summary,) = run_search(exp, callbacks=[killer], verbose=0)
    assert killer.killed, "the test did not kill anything"
    assert summary.error is None
    want = SearchState.from_json(direct_search["snapshots"][-1])
    assert [(h.program_json, h.score) for h in summary.state.history] == [
        (h.program_json, h.score) for h in want.history
    ]
    assert_runs_finished(exp.tracking.uri, exp.mlflow_experiment, at_least=2)


def test_search_on_ray_workers_tracks_to_mlflow_with_funnel_and_simplification(ray_session, tmp_path, direct_search):
    from metaopt.symbolic.export import ProgramOptimizer
    from metaopt.symbolic.program import Program
    from metaopt.symbolic.sweep import run_search

    exp = load_tiny(tmp_path, "symbolic.workers=2", "symbolic.cpus_per_worker=0.5", "ray.cpus_per_trial=0.5")
    (summary,) = run_search(exp, verbose=0)
    assert summary.error is None and summary.final is not None
    want = SearchState.from_json(direct_search["snapshots"][-1])
    assert [h.score for h in summary.state.history] == pytest.approx([h.score for h in want.history])
    final = summary.final
    assert final["accepted"], final["funnel"]
    for accepted in final["accepted"]:
        assert [s["stage"] for s in accepted["stages"]] == ["funnel_0", "meta_validation"]
        simplified = Program.from_json(accepted["simplified_json"])
        assert len(simplified) <= len(load_start_program(accepted["program"]))
        model = torch.nn.Linear(4, 2)
        ProgramOptimizer(model.parameters(), simplified, lr=1.0)  # exported: a torch optimizer

    client = MlflowClient(exp.tracking.uri)
    experiment = client.get_experiment_by_name("symbolic_tiny")
    parent = client.search_runs([experiment.experiment_id], "tags.`metaopt.role` = 'sweep'")[0]
    assert "search.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["accepted_programs"] == len(final["accepted"])
    (child,) = tracking.child_runs(client, experiment.experiment_id, parent.info.run_id)
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"history.csv", "best_program.txt", "accepted"} <= artifacts
    history = Path(client.download_artifacts(child.info.run_id, "history.csv", str(tmp_path))).read_text().splitlines()
    assert len(history) == 1 + len(summary.state.history)
    rows = list(csv.DictReader(history))
    # every -inf program carries its reason (this search meets one: m = arccosh(wd), NaN at step 1)
    assert [bool(r["failure"]) for r in rows] == [float(r["score"]) == -math.inf for r in rows]
    assert any("non-finite m at step 1" in r["failure"] for r in rows), [r["failure"] for r in rows]
    metrics = client.get_metric_history(child.info.run_id, "best_score")
    assert len(metrics) == iterations_for(exp.section)
    assert np.isfinite([m.value for m in metrics]).all()


def test_programs_that_raise_or_diverge_score_as_logged_failures():
    from metaopt.symbolic.program import Program, stmt
    from metaopt.symbolic.proxies import score_program

    proxy = {"task": "digits", "task_options": {"hidden": [8]}, "steps": 20, "lrs": [1.0], "seeds": 1}
    unknown = Program((stmt("update", "frobnicate", "g"),)).to_json()  # data that skipped the parser
    raised = score_program(unknown, proxy)
    assert raised.score == -math.inf and "raised ConfigError" in raised.failure and "frobnicate" in raised.failure
    ascent = Program((stmt("update", "mul", "g", -1000.0),)).to_json()  # gradient *ascent*, huge steps
    diverged = score_program(ascent, proxy)
    assert diverged.score == -math.inf and ("diverged" in diverged.failure or "non-finite" in diverged.failure)
    fine = score_program(Program((stmt("update", "mul", "g", 0.1),)).to_json(), {**proxy, "steps": 150})  # SGD
    assert fine.failure is None and fine.score > 0.5


PROXY = {"task": "digits", "task_options": {"hidden": [8]}, "steps": 20, "lrs": [1.0], "seeds": 1}


@pytest.mark.parametrize(
    "statements, failure",
    [
        # always NaN: arcsin of a value > 1 (log and sqrt of the DSL take abs, so they cannot make NaN)
        ([("a", "abs", "g"), ("b", "add", "a", 2.0), ("update", "arcsin", "b")], "lr 1: non-finite update at step 1"),
        # inf: division by zero wherever the gradient is not 0
        ([("z", "sub", "g", "g"), ("update", "div", "g", "z")], "lr 1: non-finite update at step 1"),
        # finite SGD for two steps, then exp(90) overflows float32 and 0 * inf = NaN: strict, any step fails
        (
            [
                ("v", "add", "v", 1.0),
                ("x", "mul", "v", 30.0),
                ("t", "exp", "x"),
                ("t", "mul", "t", 0.0),
                ("u", "mul", "g", 0.01),
                ("update", "add", "u", "t"),
            ],
            "lr 1: non-finite update at step 3",
        ),
        # a NaN state is a failure too, even though the update itself stays finite (arccosh of |w| < 1)
        ([("update", "mul", "g", 0.01), ("m", "arccosh", "w")], "lr 1: non-finite m at step 1"),
    ],
)
def test_programs_with_nonfinite_outputs_score_minus_inf_with_the_step(statements, failure):
    """The interpreter's guard zeroes NaN/inf outputs; scoring must not let it pass a broken program off as one
    that just makes no (or fewer) updates."""
    from metaopt.symbolic.program import Program, stmt
    from metaopt.symbolic.proxies import score_program

    program = Program(tuple(stmt(*s) for s in statements)).to_json()
    result = score_program(program, {**PROXY, "lrs": [1.0, 0.5], "seeds": 2})
    assert result.score == -math.inf and result.per_lr == (-math.inf, -math.inf)
    assert result.failure == f"{failure}; {failure.replace('lr 1:', 'lr 0.5:')}"


def test_adamw_and_lion_score_finitely_though_adamw_makes_0_over_0():
    """AdamW without epsilon (the search's start) computes 0/0 = NaN for weights that never had a gradient
    (always-blank pixels of digits): that is no fault of the program, and it must still score."""
    from metaopt.symbolic.export import NonFiniteProgramError, ProgramOptimizer, raise_on_nonfinite
    from metaopt.symbolic.program import adamw_program
    from metaopt.symbolic.proxies import score_program

    adamw = score_program(adamw_program().to_json(), {**PROXY, "steps": 30, "lrs": [1.0, 10.0]})
    assert adamw.failure is None and adamw.score > 0.3
    lion = score_program(lion_program().to_json(), {**PROXY, "steps": 30, "lrs": [1e-3, 3e-3]})
    assert lion.failure is None and math.isfinite(lion.score)
    lm = {
        "task": "tiny_lm",
        "task_options": {"seq_len": 16, "d_model": 16, "train_sequences": 64, "val_sequences": 32},
        "steps": 10,
        "lrs": [1.0],
        "seeds": 1,
    }
    assert score_program(adamw_program().to_json(), lm).failure is None  # embedding rows of unseen tokens
    task = build_task("digits", {"hidden": [8]}, {"name": "program", "program": adamw_program().to_json()}, seed=0)
    with raise_on_nonfinite():
        task.train(3, lambda _s: 1.0)
    assert task.optimizer.nonfinite_steps == 3  # the guard did see NaN (and zeroed it): the 0/0 entries

    # outside the search the guard stays a safety net; inside raise_on_nonfinite the same step raises
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    user = ProgramOptimizer(
        model.parameters(),
        "def train(w, g, m, v, lr):\n    u = w + 5\n    update = arcsin(u)\n    return update, m, v\n",
    )
    before = [p.detach().clone() for p in model.parameters()]
    user.step()
    assert user.last_finite is False and user.nonfinite_steps == 1 and user.steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with raise_on_nonfinite(), pytest.raises(NonFiniteProgramError, match="non-finite update at step 2"):
        user.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def _member(index: int, score: float):
    from metaopt.symbolic.analysis import functional_hash
    from metaopt.symbolic.search import Scored

    program = lion_program()
    return Scored(program.to_json(), score, 1.0, functional_hash(program), index, None)


def test_tournament_ties_go_to_the_younger_member():
    from metaopt.symbolic.search import tournament

    population = [_member(i, s) for i, s in enumerate([0.5, 0.9, 0.2, 0.9, 0.9, 0.1])]
    rng = np.random.default_rng(0)
    for _ in range(200):
        state = rng.bit_generator.state
        picks = rng.choice(len(population), size=3, replace=False)
        rng.bit_generator.state = state
        best = max(population[i].score for i in picks)
        expected = max(i for i in picks if population[i].score == best)  # the youngest of the best
        assert tournament(population, 3, rng) is population[expected]
    # a full tournament over equal scores picks the youngest member; over mixed scores, the youngest best
    assert tournament([_member(i, 0.7) for i in range(5)], 5, rng).index == 4
    assert tournament(population, len(population), rng).index == 4
    assert tournament([_member(i, -math.inf) for i in range(3)], 3, rng).index == 2


def test_functional_hash_separates_programs_that_use_lr_differently():
    from metaopt.symbolic.analysis import functional_hash
    from metaopt.symbolic.program import Program, stmt

    def program(*statements):
        return Program(tuple(statements))

    sgd = program(stmt("update", "mul", "g", "lr"))
    fixed = program(stmt("update", "mul", "g", 0.01))  # = sgd at lr 0.01 only
    squared = program(stmt("t", "mul", "lr", "lr"), stmt("t", "mul", "t", 100.0), stmt("update", "mul", "g", "t"))
    # at the single rate the hash used to run at, all three compute the same updates and collided
    assert len({functional_hash(p, lrs=0.01) for p in (sgd, fixed, squared)}) == 1
    assert len({functional_hash(p) for p in (sgd, fixed, squared)}) == 3
    # equivalent programs still share a hash at every rate
    swapped = program(stmt("update", "mul", "lr", "g"))
    doubled = program(stmt("t", "add", "lr", "lr"), stmt("t", "mul", "t", 0.5), stmt("update", "mul", "t", "g"))
    assert functional_hash(swapped) == functional_hash(doubled) == functional_hash(sgd)
    assert functional_hash(lion_program(), lrs=(0.01, 0.3)) == functional_hash(lion_program())
    assert functional_hash(lion_program(), lrs=(0.3, 0.01)) != functional_hash(lion_program())


def test_a_checkpoint_from_before_the_restart_split_resumes(tmp_path):
    """A state written when one ``restarts`` field counted the plateau restarts (restart_after; now restarts_best)
    loads with the count kept there and goes on exactly like the same state in today's format."""
    from metaopt.symbolic.search import search_metrics

    exp = load_tiny(tmp_path, "symbolic.restart_after=2", "symbolic.population=4", "symbolic.batch=2")
    state = init_search(exp.section, seed=1, scorer=HashScorer())
    for _ in range(3):
        state = search_step(state, exp.section, HashScorer())
    state.restarts_best = 3
    current = json.loads(state.to_json())
    legacy = {k: v for k, v in current.items() if k not in ("restarts_start", "restarts_best")}
    legacy["restarts"] = 3  # the pre-change layout: Scored rows unchanged, one restart counter
    old = SearchState.from_json(json.dumps(legacy))
    assert (old.restarts_start, old.restarts_best, old.restarts) == (0, 3, 3)
    assert old.to_json() == state.to_json() and "restarts" not in json.loads(old.to_json())
    assert search_metrics(old)["restarts_best"] == 3
    assert (
        search_step(old, exp.section, HashScorer()).to_json()
        == search_step(SearchState.from_json(state.to_json()), exp.section, HashScorer()).to_json()
    )


@pytest.mark.parametrize("field", ["restart_every", "restart_after"])
def test_a_restart_every_iteration_is_one_config_error(tmp_path, field):
    from metaopt.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_tiny(tmp_path, f"symbolic.{field}=1")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"symbolic.{field}: must be 0 (off) or >= 2")
    for ok in (0, 2):
        assert getattr(load_tiny(tmp_path, f"symbolic.{field}={ok}").section, field) == ok
