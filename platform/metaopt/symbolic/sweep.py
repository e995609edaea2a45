"""The ``symbolic`` experiment: Ray -> Tune (a trial per search seed) -> funnel -> MLflow -> summary.

Per trial (child run): metrics per iteration, ``history.csv`` (every scored program: index, parent, score,
best lr, functional hash, cache hit, program), ``best_program.txt``, and per accepted program its text, its
simplified text and the simplification report under ``accepted/``. On the parent run: ``search.png`` (score
of every evaluated program and the best so far), the best accepted program and a table printed at the end.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaopt import report, tracking
from metaopt.config import Experiment
from metaopt.session import SweepEnd, open_session, sweep_settings

HISTORY_COLUMNS = ["index", "parent", "origin", "score", "best_lr", "hash", "cached", "failure", "program"]


@dataclass
class SearchSummary:
    trial_id: str
    seed: int
    state: Any  # SearchState or None
    final: dict[str, Any] | None
    error: str | None


def run_search(exp: Experiment, *, address: str | None = None, callbacks: list[Any] | None = None, verbose: int = 1):
    from metaopt.symbolic.search import iterations_for
    from metaopt.symbolic.tune import build_tuner

    started = time.time()
    section = exp.section
    session = open_session(exp, address, "search", verbose)
    print(
        f"[metaopt] symbolic search from {section.start!r}: {section.evaluations} evaluations in "
        f"at most {iterations_for(section)} iterations of {section.batch}, population {section.population}, "
        f"proxy {section.proxy.task} ({section.proxy.steps} steps x lrs {section.proxy.lrs})",
        flush=True,
    )
    trial_callback = tracking.MLflowTrialCallback(session.opening)
    progress = []
    if verbose == 1:
        from metaopt.progress import ProgressPrinter

        progress = [ProgressPrinter("best_score", "max", iterations_for(section))]
    with SweepEnd(exp, session, trial_callback, iterations_for(section), started) as end:
        sweep = sweep_settings(session, exp, [trial_callback, *progress, *(callbacks or [])], verbose)
        tuner = build_tuner(section, sweep)
        results = tuner.fit()
        end.conclude(results)
        summaries = [summarise(result) for result in results]
        log_search(session.parent, summaries, trial_callback.trial_runs, exp)
        print(format_summary(summaries), flush=True)
    return summaries


def summarise(result) -> SearchSummary:
    from metaopt.symbolic.tune import read_search_checkpoint
    from metaopt.tuning import UnreadableCheckpoint

    state = final = None
    metrics = result.metrics or {}
    if result.checkpoint is not None:
        try:  # one broken checkpoint must not cost the sweep its summary of the other searches
            state, final = read_search_checkpoint(Path(result.checkpoint.path))
        except UnreadableCheckpoint as err:
            print(f"[metaopt] warning: trial {metrics.get('trial_id', result.path)}: {err}", flush=True)
    return SearchSummary(
        trial_id=report.trial_id(result),
        seed=int((result.config or {}).get("seed", -1)),
        state=state,
        final=final,
        error=report.error_line(result),
    )


def log_search(parent: tracking.ParentRun, summaries: list[SearchSummary], trial_runs: dict[str, str], exp) -> None:
    from metaopt.symbolic.text import format_program

    client = parent.client
    for s in summaries:
        run_id = trial_runs.get(s.trial_id)
        if run_id is None or s.state is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            report.write_csv(
                root / "history.csv",
                HISTORY_COLUMNS,
                [
                    [
                        h.index,
                        h.parent,
                        h.origin,
                        h.score,
                        h.best_lr,
                        h.hash[:16],
                        h.cached,
                        h.failure or "",
                        " ; ".join(format_program(h.program).splitlines()[1:-1]).replace("    ", ""),
                    ]
                    for h in s.state.history
                ],
            )
            (root / "best_program.txt").write_text(format_program(s.state.best.program) + "\n")
            if s.final:
                accepted = root / "accepted"
                accepted.mkdir()
                for a in s.final["accepted"]:
                    (accepted / f"program_{a['index']}.txt").write_text(a["program"] + "\n")
                    (accepted / f"program_{a['index']}_simplified.txt").write_text(a["simplified"] + "\n")
                    (accepted / f"program_{a['index']}_simplified.json").write_text(a["simplified_json"])
                    (accepted / f"program_{a['index']}_report.txt").write_text(a["report"] + "\n")
            client.log_artifacts(run_id, str(root))
    states = {s.trial_id: s.state for s in summaries if s.state is not None}
    if states:
        parent.log_figure(plot_search(states, f"{exp.name}: program scores"), "search.png")
    accepted = [(a["proxy_score"], s.trial_id, a) for s in summaries if s.final for a in s.final["accepted"]]
    best = [s.state.best.score for s in summaries if s.state is not None]
    parent.log_metrics(
        {
            "accepted_programs": len(accepted),
            "best_score": max(best) if best else math.nan,
            "start_score": next((s.state.start.score for s in summaries if s.state is not None), math.nan),
        }
    )
    if accepted:
        _, trial_id, top = max(accepted, key=lambda x: x[0])
        parent.log_json("best_accepted.json", {"trial_id": trial_id, **top})


def plot_search(states: dict[str, Any], title: str):
    """Every evaluated program's score (dots) and the best so far (a line) per search; the start program dotted."""
    fig, ax = report.figure(size=(8, 4))
    for trial, state in states.items():
        xs = [h.index for h in state.history if math.isfinite(h.score)]
        ys = [h.score for h in state.history if math.isfinite(h.score)]
        ax.scatter(xs, ys, s=6, alpha=0.4)
        best, curve = -math.inf, []
        for h in state.history:
            best = max(best, h.score)
            curve.append(best)
        ax.plot(range(len(curve)), curve, lw=1.8, label=f"{trial}: best so far")
        ax.axhline(state.start.score, color="grey", ls=":", lw=1)
    report.label_axes(
        ax, x="program evaluated", y="proxy score (validation metric)", title=title, title_size=10, legend=7
    )
    fig.tight_layout()
    return fig


def format_summary(summaries: list[SearchSummary]) -> str:
    lines = []
    for s in summaries:
        if s.error or s.state is None:
            lines.append(f"trial {s.trial_id} (seed {s.seed}): FAILED {s.error}")
            continue
        st = s.state
        lines.append(
            f"trial {s.trial_id} (seed {s.seed}): {len(st.history)} programs, {st.cache_hits} cache hits, "
            f"{st.restarts} restarts; start score {st.start.score:.4f}, "
            f"best {st.best.score:.4f} (program {st.best.index})"
        )
        for a in (s.final or {}).get("accepted", []):
            stages = ", ".join(f"{x['stage']} {x['score']:.4f} vs {x['start_score']:.4f}" for x in a["stages"])
            lines.append(f"  ACCEPTED program {a['index']}: proxy {a['proxy_score']:.4f}; {stages}")
            lines.append("  " + a["report"].replace("\n", "\n  "))
        if s.final and not s.final["accepted"]:
            lines.append("  no program beat the start program at every funnel stage")
    return "\n".join(lines)
