"""The ``lpo`` experiment, top to bottom: Ray -> Tune (a trial per meta-seed, an iteration per ES generation)
-> the discovered drift of every trial exported -> MLflow (curves, heat-maps, drift artifacts) -> summary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaopt import report, tracking
from metaopt.config import Experiment
from metaopt.session import SweepEnd, open_session, sweep_settings

#: Artifact folder of an exported drift, on the parent run (best trial) and on each trial's run.
DRIFT_ARTIFACT = "drift"
TABLE = (
    report.Column("trial", 16, align="<"),
    report.Column("meta-seed", 10),
    report.Column("generations", 12),
    report.Column("fitness", 10, ".3f"),
    report.Column("start score", 12, ".3f"),
    report.Column("eval score", 12, ".3f"),
    report.Column("status", align="<", gap="  "),
)
TABLE_NOTE = (
    "(scores: final mean return normalised by PPO's on the same env and horizon; 1.0 = PPO's baseline "
    "seeds; start score = the ES mean at generation 0, i.e. PPO's objective, on the evaluation seeds)"
)


@dataclass
class MetaTrialSummary:
    trial_id: str
    meta_seed: int
    generations: int
    fitness_mean: float
    mean_score: float
    start_mean_score: float
    drift_dir: str | None
    curves: dict[str, tuple[list[int], list[float]]]
    error: str | None = None


@dataclass
class MetaSummary:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    trials: list[MetaTrialSummary]
    best_trial: str | None
    wall_seconds: float

    def best(self) -> MetaTrialSummary | None:
        return next((t for t in self.trials if t.trial_id == self.best_trial), None)


def run_meta_training(
    exp: Experiment, *, address: str | None = None, callbacks: list[Any] | None = None, verbose: int = 1
):
    """The ``lpo`` kind: meta-train on Ray Tune (one trial per meta-seed), log to MLflow, export the drift."""
    from metaopt.objectives.tune import build_tuner

    started = time.time()
    section = exp.section
    session = open_session(exp, address, section.drift, verbose)
    print(
        f"[metaopt] meta-training {section.drift} with OpenAI-ES: population {section.es.population}, "
        f"{section.es.generations} generations, envs {', '.join(s.env for s in section.envs)}; "
        "the first generation compiles PPO (tens of seconds)",
        flush=True,
    )
    trial_callback = tracking.MLflowTrialCallback(session.opening)
    progress = []
    if verbose == 1:
        from metaopt.progress import ProgressPrinter

        progress = [ProgressPrinter("fitness_mean", "max", section.es.generations)]
    with SweepEnd(exp, session, trial_callback, section.es.generations, started) as end:
        sweep = sweep_settings(session, exp, [trial_callback, *progress, *(callbacks or [])], verbose)
        tuner = build_tuner(section, sweep)
        results = tuner.fit()
        end.conclude(results)
        trials = [summarise_trial(result) for result in results]
        parent = session.parent
        scored = [t for t in trials if math.isfinite(t.mean_score)]
        best = max(scored, key=lambda t: t.mean_score) if scored else None
        summary = MetaSummary(
            exp.name, parent.run_id, exp.tracking.uri, trials, best.trial_id if best else None, time.time() - started
        )
        log_summary(parent, summary, exp, trial_callback.trial_runs)
        print(format_table(summary), flush=True)
    if best:
        print(
            f"[metaopt] discovered drift: artifact '{DRIFT_ARTIFACT}/' of run {parent.run_id}; evaluate it with "
            f"objectives: [ppo, dpo, mlflow:{parent.run_id}] in an lpo_eval experiment"
        )
    return summary


def summarise_trial(result) -> MetaTrialSummary:
    from metaopt.objectives.tune import DRIFT_DIR

    metrics = result.metrics or {}
    reported = report.progress_curves(result, {"generation", "fitness_mean", "mean_score"}.__contains__)
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for key in ("fitness_mean", "mean_score"):
        if key in reported:
            generations, values = report.measured(reported["generation"], reported[key])
            curves[key] = ([int(g) for g in generations], values)
    drift_dir = None
    if result.checkpoint is not None and (Path(result.checkpoint.path) / DRIFT_DIR).exists():
        drift_dir = str(Path(result.checkpoint.path) / DRIFT_DIR)
    scores = curves.get("mean_score", ([], []))[1]
    return MetaTrialSummary(
        trial_id=report.trial_id(result),
        meta_seed=int(result.config.get("meta_seed", -1)) if result.config else -1,
        generations=int(metrics.get("generation", 0)),
        fitness_mean=float(metrics.get("fitness_mean", math.nan)),
        mean_score=float(scores[-1]) if scores else math.nan,
        start_mean_score=float(metrics.get("start_mean_score", math.nan)),
        drift_dir=drift_dir,
        curves=curves,
        error=report.error_line(result),
    )


def log_summary(parent: tracking.ParentRun, summary: MetaSummary, exp: Experiment, trial_runs: dict[str, str]) -> None:
    """Each trial's drift on its own run; the best one, heat-maps and curves on the parent."""
    from metaopt.objectives import plots
    from metaopt.objectives.export import load_drift

    for t in summary.trials:
        if t.drift_dir and trial_runs.get(t.trial_id):
            parent.client.log_artifacts(trial_runs[t.trial_id], t.drift_dir, DRIFT_ARTIFACT)
    curves = {t.trial_id: {**t.curves, "start_mean_score": t.start_mean_score} for t in summary.trials}
    parent.log_figure(
        plots.plot_meta_curves(curves, summary.best_trial, f"{exp.name}: meta-training"), "meta_training.png"
    )
    best = summary.best()
    parent.log_metrics(
        {
            "best_mean_score": best.mean_score if best else math.nan,
            "failed_trials": sum(bool(t.error) for t in summary.trials),
            "wall_seconds": summary.wall_seconds,
        }
    )
    if best and best.drift_dir:
        parent.client.log_artifacts(parent.run_id, best.drift_dir, DRIFT_ARTIFACT)
        drift_fn, params = load_drift(best.drift_dir)
        section = exp.section
        log_horizon = reference_log_horizon(section.envs[0].env, section.envs[0].total_timesteps, section.envs[0].ppo)
        figure = plots.plot_drift_heatmaps(
            {f"{section.drift} (best)": (drift_fn, params)},
            [0.0, 0.5, 1.0],
            log_horizon,
            f"{exp.name}: discovered drift",
        )
        parent.log_figure(figure, "drift_heatmaps.png")


def reference_log_horizon(env: str, total_timesteps: int, ppo: dict[str, Any]) -> float:
    """log N (N = the run's env steps, as :func:`metaopt.objectives.ppo.progress_at`) of a problem, the TA-LPO
    input used for its heat-maps; ``env`` and ``ppo`` are kept for callers (N does not depend on them)."""
    del env, ppo
    return math.log(total_timesteps)


def format_table(summary: MetaSummary) -> str:
    """One line per trial, best evaluation score first."""
    lines = []
    for t in sorted(summary.trials, key=lambda t: -t.mean_score if math.isfinite(t.mean_score) else math.inf):
        status = "FAILED " + (t.error or "") if t.error else ("BEST" if t.trial_id == summary.best_trial else "ok")
        lines.append([t.trial_id, t.meta_seed, t.generations, t.fitness_mean, t.start_mean_score, t.mean_score, status])
    return report.format_table(TABLE, lines, notes=[TABLE_NOTE])
