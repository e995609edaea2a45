"""Symbolic discovery of optimizers, top to bottom (Chen et al. 2023, Sec. 2-3).

1. start from a program (AdamW without bias correction, or any program text) and score it on the proxy;
2. each iteration, for ``batch`` children: pick a parent by tournament over the living population
   (regularized evolution, Real et al. 2019) and mutate it (insert / delete / modify, re-mutating invalid
   children, :mod:`metaopt.symbolic.mutation`). Restarts (Chen et al. 2023, Sec. 2) instead replace the whole
   population by ``population`` mutants: of the start program every ``restart_every`` iterations
   (exploration), of the best program after ``restart_after`` iterations without a new best (exploitation);
   the periodic restart wins when both are due. The best so far stays in the state's history;
3. look each child up by its functional hash (:mod:`metaopt.symbolic.analysis`): semantically duplicate
   programs reuse their score; the rest are scored in parallel (Ray tasks) on the proxy;
4. the children join the population; the oldest members die (after a restart: all of the old population);
5. once the budget of evaluations is spent (a restart scores a whole population, so the last iteration may pass
   the budget by up to ``population`` programs), the ``funnel_top`` best programs face larger proxies and a
   held-out meta-validation task; a program is accepted when it beats the start program by ``margin`` at
   every stage. Accepted programs are simplified (dead code, algebraic rewrites, and statements whose removal
   does not hurt the proxy score) and exported as MLflow artifacts.

The search state is plain data (programs as JSON, scores, the numpy generator's state), checkpointed every
iteration by the Tune trainable in :mod:`metaopt.symbolic.tune`; a restored search continues identically.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metaopt.errors import ConfigError
from metaopt.symbolic.program import BUILTIN_PROGRAMS, Program
from metaopt.symbolic.program_files import names_program_file


def load_start_program(value: Any) -> Program:
    """``adamw`` / ``lion``, program text, program JSON, or a file holding either -> a valid Program."""
    from metaopt.symbolic.analysis import infer_types
    from metaopt.symbolic.text import ProgramSyntaxError, parse_program

    if isinstance(value, Program):
        program = value
    elif not isinstance(value, str) or not value.strip():
        raise ConfigError("start", f"must be adamw, lion, program text or a file (got {value!r})")
    elif value in BUILTIN_PROGRAMS:
        program = BUILTIN_PROGRAMS[value]()
    else:
        text = value
        if names_program_file(value):
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError("start", f"{value!r} is not adamw, lion, program text, or an existing file")
            text = path.read_text(encoding="utf-8")
        try:
            program = Program.from_json(text) if text.lstrip().startswith("{") else parse_program(text)
        except ProgramSyntaxError as err:
            raise ConfigError("start", f"program {err!s}") from None
        except ValueError as err:
            raise ConfigError("start", f"not a program: {str(err).splitlines()[0]}") from None
    check = infer_types(program)
    if not check.valid:
        raise ConfigError("start", f"invalid program: {check.reason}")
    return program


@dataclass
class Scored:
    """One evaluated program and where it came from."""

    program_json: str
    score: float
    best_lr: float
    hash: str
    index: int  # order of evaluation (0 = the start program)
    parent: int | None
    cached: bool = False
    origin: str = "tournament"  # how the parent was chosen: tournament, restart_start, restart_best (start: start)
    failure: str | None = None  # why the program scored -inf (raised, non-finite, diverged)

    @property
    def program(self) -> Program:
        return Program.from_json(self.program_json)


@dataclass
class SearchState:
    population: list[Scored]
    history: list[Scored]
    cache: dict[str, list[Any]]  # functional hash -> [score, best_lr, failure]
    rng_state: dict[str, Any]
    iteration: int = 0
    best_index: int = 0
    since_best: int = 0
    restarts_start: int = 0  # periodic restarts from the start program (exploration)
    restarts_best: int = 0  # plateau restarts from the best program (exploitation)
    cache_hits: int = 0

    @property
    def restarts(self) -> int:
        return self.restarts_start + self.restarts_best

    @property
    def best(self) -> Scored:
        return self.history[self.best_index]

    @property
    def start(self) -> Scored:
        return self.history[0]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SearchState:
        data = upgrade_state(json.loads(text))
        history = [Scored(**s) for s in data.pop("history")]
        population = [history[s["index"]] for s in data.pop("population")]
        return cls(population=population, history=history, **data)


def upgrade_state(data: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint written before restarts were split by kind (Chen et al. 2023, Sec. 2) counts them in one
    ``restarts`` field. Each was triggered by ``restart_after`` iterations without a new best, the plateau restart
    now counted as ``restarts_best``: the count is kept there and the search resumes where it stopped."""
    if "restarts" in data and "restarts_start" not in data and "restarts_best" not in data:
        data = {**data, "restarts_best": data["restarts"]}
    data.pop("restarts", None)
    return data


def proxy_dict(spec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def _score(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def init_search(section, seed: int, scorer) -> SearchState:
    """Score the start program; it is the whole initial population."""
    from metaopt.symbolic.analysis import functional_hash

    program = load_start_program(section.start)
    (result,) = scorer.score([program], proxy_dict(section.proxy))
    start = Scored(
        program.to_json(),
        _score(result.score),
        result.best_lr,
        functional_hash(program),
        0,
        None,
        origin="start",
        failure=result.failure,
    )
    rng = np.random.default_rng(seed)
    cache = {start.hash: [start.score, start.best_lr, start.failure]}
    return SearchState([start], [start], cache, rng.bit_generator.state)


def tournament(population: list[Scored], size: int, rng: np.random.Generator) -> Scored:
    """The best of ``size`` distinct members drawn uniformly (ties: the younger one, i.e. the later in the
    population, which is kept in order of evaluation)."""
    picks = rng.choice(len(population), size=min(size, len(population)), replace=False)
    return population[max((int(i) for i in picks), key=lambda i: (population[i].score, i))]


def restart_due(state: SearchState, section) -> str | None:
    """Which restart (Chen et al. 2023, Sec. 2) the next iteration does: ``"restart_start"`` every
    ``restart_every`` iterations (exploration), else ``"restart_best"`` once ``restart_after`` iterations passed
    without a new best (exploitation, on a plateau), else None. 0 switches either off."""
    if section.restart_every and (state.iteration + 1) % section.restart_every == 0:
        return "restart_start"
    if section.restart_after and state.since_best >= section.restart_after:
        return "restart_best"
    return None


def search_step(state: SearchState, section, scorer) -> SearchState:
    """One iteration: ``batch`` children by tournament + mutation, scored, aged in; or, on a restart, a whole new
    population of mutants of the start or the best program, scored, replacing the old one (ages reset)."""
    from metaopt.symbolic.analysis import functional_hash
    from metaopt.symbolic.mutation import mutate

    rng = np.random.default_rng()
    rng.bit_generator.state = state.rng_state
    restart = restart_due(state, section)
    if restart == "restart_start":
        state.restarts_start += 1
    elif restart == "restart_best":
        state.restarts_best += 1
    children: list[tuple[Program, int, str]] = []
    if restart:
        state.since_best = 0
        state.population = []  # the whole population is reseeded; the best stays in the history
        parent = state.start if restart == "restart_start" else state.best
        children = [(mutate(parent.program, rng), parent.index, restart) for _ in range(section.population)]
    for _ in range(0 if restart else section.batch):
        parent = tournament(state.population, section.tournament, rng)
        children.append((mutate(parent.program, rng), parent.index, "tournament"))
    hashes = [functional_hash(child) for child, _, _ in children]
    fresh = {}
    for (child, _, _), h in zip(children, hashes):
        if h not in state.cache and h not in fresh:
            fresh[h] = child
    results = dict(zip(fresh, scorer.score(list(fresh.values()), proxy_dict(section.proxy)))) if fresh else {}
    previous_best = state.best.score
    for (child, parent, origin), h in zip(children, hashes):
        cached = h in state.cache
        if not cached:
            state.cache[h] = [_score(results[h].score), results[h].best_lr, results[h].failure]
        else:
            state.cache_hits += 1
        score, best_lr, failure = state.cache[h]
        scored = Scored(child.to_json(), score, best_lr, h, len(state.history), parent, cached, origin, failure)
        state.history.append(scored)
        state.population.append(scored)
        if len(state.population) > section.population:
            state.population.pop(0)  # regularized evolution: the oldest dies, not the worst
        if score > state.best.score:
            state.best_index = scored.index
    state.since_best = 0 if state.best.score > previous_best else state.since_best + 1
    state.iteration += 1
    state.rng_state = rng.bit_generator.state
    return state


def iterations_for(section) -> int:
    """Tune iterations that spend the evaluation budget without restarts (the start program counts as the
    first): the most a search runs. Restarts spend it sooner, see :func:`search_done`."""
    return max(1, math.ceil((section.evaluations - 1) / section.batch))


def search_done(state: SearchState, section) -> bool:
    """The evaluation budget is spent (restarts score a whole population in one iteration)."""
    return len(state.history) >= section.evaluations or state.iteration >= iterations_for(section)


def search_metrics(state: SearchState) -> dict[str, float]:
    scores = [s.score for s in state.population if math.isfinite(s.score)]
    evaluated = len(state.history)
    return {
        "best_score": state.best.score,
        "start_score": state.start.score,
        "population_mean_score": float(np.mean(scores)) if scores else math.nan,
        "population_size": len(state.population),
        "evaluations": evaluated,
        "trained": evaluated - state.cache_hits,
        "cache_hits": state.cache_hits,
        "cache_hit_rate": state.cache_hits / max(evaluated - 1, 1),
        "restarts": state.restarts,
        "restarts_start": state.restarts_start,
        "restarts_best": state.restarts_best,
        "failed_programs": sum(1 for s in state.history if s.failure),
        "since_best": state.since_best,
        "best_length": len(state.best.program),
    }


# ---- funnel and acceptance ---------------------------------------------------------------------------------


@dataclass
class FunnelResult:
    index: int
    program_json: str
    proxy_score: float
    stages: list[dict[str, Any]] = field(default_factory=list)  # per stage: name, score, start_score, passed
    accepted: bool = False


def top_unique(state: SearchState, count: int) -> list[Scored]:
    """The best ``count`` programs by proxy score, one per functional hash, never the start program itself."""
    seen, out = {state.start.hash}, []
    for s in sorted(state.history, key=lambda s: (-s.score, s.index)):
        if s.hash not in seen and math.isfinite(s.score):
            seen.add(s.hash)
            out.append(s)
        if len(out) == count:
            break
    return out


def funnel(state: SearchState, section, scorer) -> list[FunnelResult]:
    """Larger proxies, then the held-out meta-validation task; accepted = beats the start program everywhere."""
    stages = [(f"funnel_{i}", spec) for i, spec in enumerate(section.funnel)]
    if section.meta_validation is not None:
        stages.append(("meta_validation", section.meta_validation))
    candidates = top_unique(state, section.funnel_top)
    results = [FunnelResult(c.index, c.program_json, c.score) for c in candidates]
    alive = [r for r in results if r.proxy_score > state.start.score + section.margin]
    for name, spec in stages:
        if not alive:
            break
        programs = [state.start.program] + [Program.from_json(r.program_json) for r in alive]
        scores = scorer.score(programs, proxy_dict(spec))
        start_score = _score(scores[0].score)
        survivors = []
        for r, s in zip(alive, scores[1:]):
            passed = _score(s.score) > start_score + section.margin
            r.stages.append(
                {
                    "stage": name,
                    "score": _score(s.score),
                    "start_score": start_score,
                    "passed": passed,
                    "best_lr": s.best_lr,
                }
            )
            if passed:
                survivors.append(r)
        alive = survivors
    for r in alive:
        r.accepted = True
    return results
