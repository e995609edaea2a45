"""The only place in ``metaopt.symbolic`` that knows Ray Tune: one trial = one search, one iteration = one batch.

A checkpoint is the search state as JSON (every scored program, the population, the hash cache and the
numpy generator state) plus, after the last iteration, ``final.json`` (funnel results and simplified
accepted programs). Scoring is deterministic on the CPU, so a restored search continues identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune

from metaopt.cache import replace_atomically
from metaopt.runtime import with_worker_bundles
from metaopt.symbolic.config import SymbolicSection
from metaopt.symbolic.search import (
    SearchState,
    funnel,
    init_search,
    iterations_for,
    proxy_dict,
    search_done,
    search_metrics,
    search_step,
)
from metaopt.trainable import Trainable
from metaopt.tuning import SweepSettings, grid_tuner, read_checkpoint_file

STATE_FILE = "search_state.json"
FINAL_FILE = "final.json"


def make_scorer(section: SymbolicSection):
    from metaopt.symbolic.proxies import LocalScorer, RayScorer

    return RayScorer(section.cpus_per_worker, section.gpus_per_worker) if section.workers else LocalScorer()


def finish(state: SearchState, section: SymbolicSection, scorer) -> dict[str, Any]:
    """Funnel the best programs; simplify the accepted ones against the proxy score."""
    from metaopt.symbolic.program import Program
    from metaopt.symbolic.simplify import simplify
    from metaopt.symbolic.text import format_program

    results = funnel(state, section, scorer)
    proxy = proxy_dict(section.proxy)
    accepted = []
    for r in results:
        if not r.accepted:
            continue
        program = Program.from_json(r.program_json)
        report = simplify(program, score_fn=lambda p: scorer.score([p], proxy)[0].score, tolerance=0.0)
        accepted.append(
            {
                "index": r.index,
                "proxy_score": r.proxy_score,
                "stages": r.stages,
                "program": format_program(program),
                "simplified": format_program(report.after),
                "simplified_json": report.after.to_json(),
                "steps": list(report.steps),
                "report": report.format(),
            }
        )
    return {
        "funnel": [r.__dict__ for r in results],
        "accepted": accepted,
        "best": {"index": state.best.index, "score": state.best.score, "program": format_program(state.best.program)},
        "start": {"score": state.start.score, "program": format_program(state.start.program)},
    }


class SearchTrainable(Trainable):
    """``config['exp']``: the resolved ``symbolic`` section; ``config['seed']``: this search's seed."""

    def start(self, config: dict[str, Any]) -> None:
        self.section = SymbolicSection.model_validate(config["exp"])
        self.scorer = make_scorer(self.section)
        self.state: SearchState | None = None
        self.final: dict[str, Any] | None = None

    def step(self) -> dict[str, Any]:
        if self.state is None:  # scored here, not in setup: a restored trial never re-scores the start program
            self.state = init_search(self.section, int(self.config["seed"]), self.scorer)
        self.state = search_step(self.state, self.section, self.scorer)
        metrics = search_metrics(self.state)
        metrics["accepted"] = 0
        if search_done(self.state, self.section):
            self.final = finish(self.state, self.section, self.scorer)
            metrics["accepted"] = len(self.final["accepted"])
            metrics["done"] = True
        return metrics

    def write_checkpoint(self, directory: Path) -> None:
        if self.state is not None:
            state = self.state.to_json()
            replace_atomically(directory / STATE_FILE, lambda tmp: tmp.write_text(state))
        if self.final is not None:
            final = json.dumps(self.final, indent=1)
            replace_atomically(directory / FINAL_FILE, lambda tmp: tmp.write_text(final))

    def read_checkpoint(self, directory: Path) -> int | None:
        state, final = read_search_checkpoint(directory)
        if final is not None:
            self.final = final
        if state is None:
            return None
        self.state = state
        return state.iteration

    def cleanup(self) -> None:
        self.scorer.close()


def read_search_checkpoint(directory: Path) -> tuple[SearchState | None, dict[str, Any] | None]:
    """The search state and final results a checkpoint folder holds (None for a file it does not have);
    :class:`~metaopt.tuning.UnreadableCheckpoint` naming the file when one is truncated or corrupt."""
    state = final = None
    if (directory / STATE_FILE).exists():
        state = read_checkpoint_file(directory / STATE_FILE, lambda path: SearchState.from_json(path.read_text()))
    if (directory / FINAL_FILE).exists():
        final = read_checkpoint_file(directory / FINAL_FILE, lambda path: json.loads(path.read_text()))
    return state, final


def trial_resources(section: SymbolicSection, per_trial: dict[str, float]):
    """The trial's own slot plus one bundle per scoring worker."""
    return with_worker_bundles(per_trial, section.workers, section.cpus_per_worker, section.gpus_per_worker)


def build_tuner(section: SymbolicSection, sweep: SweepSettings) -> tune.Tuner:
    """One trial per search seed; a checkpoint every ``checkpoint_every`` iterations and at the end, the last
    ``sweep.checkpoints_to_keep`` kept."""
    param_space = {"exp": section.model_dump(mode="json"), "seed": tune.grid_search(list(section.seeds))}
    return grid_tuner(
        SearchTrainable,
        trial_resources(section, sweep.resources),
        param_space,
        iterations=iterations_for(section),
        scheduler=None,
        max_failures=section.max_failures,
        sweep=sweep,
        checkpoint_every=section.checkpoint_every,
    )
