"""One learning-rate sweep, top to bottom: Ray -> Tune (PBT / PB2 / fixed-LR baseline) -> schedules -> MLflow.

1. connect to Ray and MLflow, open the sweep's parent run;
2. run the Tune experiment (each trial a child MLflow run, per-iteration metrics);
3. rebuild every final trial's lineage learning-rate schedule from Tune's PBT log, cross-checked
   against the history each trial carries in its checkpoints;
4. log schedules (JSON + PNG), learning curves, the summary table; print the summary and how to look at it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaopt import report, tracking
from metaopt.config import Experiment
from metaopt.errors import ConfigError
from metaopt.pbt import lineage, plots
from metaopt.pbt.replay import SCHEDULES_ARTIFACT
from metaopt.pbt.tune import STATE_FILE, build_tuner
from metaopt.redact import redact_config, redact_uri
from metaopt.session import SweepEnd, open_session, sweep_settings
from metaopt.tuning import UnreadableCheckpoint, read_state


@dataclass
class TrialSummary:
    trial_id: str
    tag: str
    final_metric: float
    best_metric: float
    final_lr: float
    iterations: int
    steps: int
    diverged: bool
    schedule: lineage.Segments
    carried_schedule: lineage.Segments | None
    curve: tuple[list[int], list[float]] = field(repr=False, default=([], []))
    reported: list[tuple[int, float]] = field(repr=False, default_factory=list)

    @property
    def lineage_agrees(self) -> bool | None:
        """Does the schedule rebuilt from Tune's log equal the one the trial carried in its checkpoints?"""
        return None if self.carried_schedule is None else lineage.same_schedule(self.schedule, self.carried_schedule)


@dataclass
class SweepSummary:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    metric: str
    mode: str
    best_trial: str | None
    trials: list[TrialSummary]
    experiment_path: str
    wall_seconds: float

    def best(self) -> TrialSummary | None:
        return next((t for t in self.trials if t.trial_id == self.best_trial), None)


def task_metric(section: Any) -> tuple[str, str]:
    """The score the section's task reports and its direction: a built-in's class attributes, or what the user's
    task said when its factory was probed while the section was validated (:func:`metaopt.tasks.task_metric_mode`)."""
    from metaopt.tasks import task_metric_mode

    return task_metric_mode(section.task, section.task_options, section.optimizer, section.seed)


def run(
    exp: Experiment, *, address: str | None = None, callbacks: list[Any] | None = None, verbose: int = 1
) -> SweepSummary:
    """Run the sweep an experiment file describes; return its summary (also printed and logged).

    ``verbose``: 0 = summary only, 1 = a compact line per trial result, 2 = Tune's own full output.
    """
    started = time.time()
    section = exp.section
    metric, mode = task_metric(section)
    session = open_session(exp, address, section.scheduler, verbose)
    trial_callback = tracking.MLflowTrialCallback(session.opening)
    with SweepEnd(exp, session, trial_callback, section.iterations, started) as end:
        progress = progress_callbacks(verbose, metric, mode, section.iterations)
        sweep = sweep_settings(session, exp, [trial_callback, *progress, *(callbacks or [])], verbose)
        tuner = build_tuner(section, sweep, metric, mode)
        results = tuner.fit()
        end.conclude(results)
        parent = session.parent
        experiment_path = Path(results.experiment_path)
        trials = summarise_trials(results, section, metric, mode, experiment_path)
        best = pick_best(trials, mode)
        summary = SweepSummary(
            experiment=exp.name,
            parent_run_id=parent.run_id,
            tracking_uri=exp.tracking.uri,
            metric=metric,
            mode=mode,
            best_trial=best.trial_id if best else None,
            trials=trials,
            experiment_path=str(experiment_path),
            wall_seconds=time.time() - started,
        )
        for t in trials:
            if t.lineage_agrees is False:
                print(
                    f"[metaopt] warning: trial {t.trial_id}: "
                    f"schedule from Tune's PBT log {lineage.describe(t.schedule)} "
                    f"differs from the one its checkpoints carried {lineage.describe(t.carried_schedule)}",
                    flush=True,
                )
        log_summary(parent, summary, exp)
        print(format_table(summary), flush=True)
    if best:
        print(
            f"[metaopt] best trial {best.trial_id}: {metric}={best.final_metric:.4f}; "
            f"schedule {lineage.describe(best.schedule)}"
        )
        print(f"[metaopt] replay it: metaopt replay {parent.run_id} --tracking-uri {redact_uri(exp.tracking.uri)}")
    return summary


def progress_callbacks(verbose: int, metric: str, mode: str, iterations: int) -> list[Any]:
    from metaopt.progress import ProgressPrinter

    return [ProgressPrinter(metric, mode, iterations)] if verbose == 1 else []


def summarise_trials(results, section, metric: str, mode: str, experiment_path: Path) -> list[TrialSummary]:
    """Per final trial: scores, lineage schedule from the PBT log and from its own checkpoint."""
    rows = []
    for result in results:
        curves = report.progress_curves(result, {"lr", "step", metric}.__contains__)
        metrics = result.metrics or {}
        if not curves:
            continue
        # PBT names trials by their original tag; Tune appends "@perturbed[...]" after each exploit.
        tag = str(metrics.get("experiment_tag", "")).split("@")[0]
        steps = [int(step) for step in curves["step"]]
        finite = [v for v in curves[metric] if math.isfinite(v)]
        rows.append(
            TrialSummary(
                trial_id=str(metrics.get("trial_id")),
                tag=tag,
                final_metric=float(metrics.get(metric, math.nan)),
                best_metric=(max if mode == "max" else min)(finite) if finite else math.nan,
                # under lr_schedule: cosine ``lr`` is the peak; ``last_lr`` the lr of the trial's last step
                final_lr=float(metrics.get("last_lr", metrics.get("lr", math.nan))),
                iterations=int(metrics.get("training_iteration", 0)),
                diverged=bool(metrics.get("diverged", 0)),
                schedule=[(0, curves["lr"][0])],
                carried_schedule=carried_history(result, str(metrics.get("trial_id"))),
                curve=(steps, curves[metric]),
                steps=int(metrics.get("step", 0)),
                reported=list(zip(steps, curves["lr"])),
            )
        )
    if section.scheduler in ("pbt", "pb2"):
        try:
            events = lineage.read_pbt_global(experiment_path / "pbt_global.txt")
            events = lineage.resume_steps(
                events,
                {row.tag: row.reported for row in rows},
                section.steps_per_iteration,
                boundary_steps=section.perturbation_interval * section.steps_per_iteration,
            )
            initial = {row.tag: row.schedule[0][1] for row in rows}
            schedules = lineage.replay_events(initial, events)
        except ValueError as err:
            # Never lose a finished sweep to the log reader: fall back to the lineage the checkpoints carried.
            print(
                f"[metaopt] warning: could not rebuild schedules from Tune's PBT log ({err}); "
                "using the histories carried in the trials' checkpoints",
                flush=True,
            )
            schedules = {row.tag: row.carried_schedule or row.schedule for row in rows}
        for row in rows:
            row.schedule = schedules[row.tag]
    elif section.lr_schedule != "constant":
        for row in rows:
            row.schedule = sampled_schedule(row.schedule[0][1], section)
            if row.carried_schedule:
                row.carried_schedule = sampled_schedule(row.carried_schedule[0][1], section)
    return rows


def sampled_schedule(peak: float, section) -> lineage.Segments:
    """A fixed-lr baseline's ``lr_schedule`` (cosine: Loshchilov & Hutter 2017, one cycle to 0 over the trial's
    budget, :func:`metaopt.pbt.lineage.trial_schedule`) as one segment per iteration, at the lr of its first step:
    what the plots and the summary table draw. ``metaopt replay`` recomputes the exact decay from the first
    segment, the peak (the cosine's value at step 0)."""
    spi = section.steps_per_iteration
    lr_at = lineage.trial_schedule(peak, section.lr_schedule, section.iterations * spi)
    return [(i * spi, float(lr_at(i * spi))) for i in range(section.iterations)]


def carried_history(result, trial_id: str) -> lineage.Segments | None:
    """The lineage history the trial carried through its checkpoints (independent of Tune's log). None, with a
    warning naming the trial and the file, when its last checkpoint cannot be read: one broken file must not
    cost the sweep its summary of the other trials."""
    if result.checkpoint is None:
        return None
    path = Path(result.checkpoint.path) / STATE_FILE
    try:
        state = read_state(path)
        return [(int(s), float(lr)) for s, lr in state["lr_history"]]
    except UnreadableCheckpoint as err:
        problem = str(err)
    except (KeyError, TypeError, ValueError):
        problem = f"checkpoint file {path} holds no lineage history"
    print(
        f"[metaopt] warning: trial {trial_id}: {problem}; its carried schedule is unknown, its other results stand",
        flush=True,
    )
    return None


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    scored = [t for t in trials if not t.diverged and math.isfinite(t.final_metric)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t.final_metric)


def schedules_payload(summary: SweepSummary, exp: Experiment) -> dict[str, Any]:
    """What ``metaopt replay`` needs: the experiment, and per trial its schedule and final score."""
    section = exp.section
    return {
        "experiment": redact_config(exp.to_dict()),  # an artifact anyone with the store can read
        "metric": summary.metric,
        "mode": summary.mode,
        "steps_per_iteration": section.steps_per_iteration,
        "total_steps": section.iterations * section.steps_per_iteration,
        "best_trial": summary.best_trial,
        "parent_run_id": summary.parent_run_id,
        "code": user_task_code(exp),
        "trials": {
            t.trial_id: {
                "tag": t.tag,
                "schedule": t.schedule,
                "carried_schedule": t.carried_schedule,
                "final_metric": t.final_metric,
                "diverged": t.diverged,
            }
            for t in summary.trials
        },
    }


def user_task_code(exp: Experiment) -> dict[str, str]:
    """What pins the user's task factory (its directory, module file and sha256,
    :func:`metaopt.user_code.code_record`) for ``metaopt replay``; empty for a built-in task or a Python object."""
    from metaopt import user_code
    from metaopt.tasks import is_user_task

    task = exp.section.task
    if not is_user_task(task):
        return {}
    try:
        return user_code.code_record(task)
    except (ConfigError, OSError):  # the module broke or vanished since the sweep started: nothing to pin
        return {}


def log_summary(parent: tracking.ParentRun, summary: SweepSummary, exp: Experiment) -> None:
    section = exp.section
    total_steps = section.iterations * section.steps_per_iteration
    payload = schedules_payload(summary, exp)
    parent.log_json(SCHEDULES_ARTIFACT, payload)
    if payload["code"]:  # the code the sweep ran, beside its config: code.user_dir, code.module_file, code.sha256
        parent.client.log_batch(parent.run_id, params=tracking.as_params({"code": payload["code"]}))
    schedules = {t.trial_id: t.schedule for t in summary.trials}
    parent.log_figure(
        plots.plot_schedules(schedules, summary.best_trial, total_steps, f"{exp.name}: lr along each lineage"),
        "schedules.png",
    )
    curves = {t.trial_id: t.curve for t in summary.trials}
    parent.log_figure(
        plots.plot_learning_curves(curves, summary.metric, summary.best_trial, f"{exp.name}: {summary.metric}"),
        "learning_curves.png",
    )
    best = summary.best()
    parent.log_metrics(
        {
            f"best_{summary.metric}": best.final_metric if best else math.nan,
            "diverged_trials": sum(t.diverged for t in summary.trials),
            "lineage_mismatches": sum(t.lineage_agrees is False for t in summary.trials),
            "wall_seconds": summary.wall_seconds,
        }
    )
    parent.log_csv(
        "summary.csv",
        [
            "trial_id",
            summary.metric,
            f"best_{summary.metric}",
            "final_lr",
            "iterations",
            "steps",
            "diverged",
            "schedule",
        ],
        [
            [
                t.trial_id,
                t.final_metric,
                t.best_metric,
                t.final_lr,
                t.iterations,
                t.steps,
                t.diverged,
                lineage.describe(t.schedule),
            ]
            for t in summary.trials
        ],
    )


def format_table(summary: SweepSummary) -> str:
    """The end-of-sweep table: one line per trial, best first, diverged trials last."""
    columns = (
        report.Column("trial", 14, align="<"),
        report.Column(summary.metric, 16, ".4f"),
        report.Column("best", 10, ".4f"),
        report.Column("final lr", 11, ".3g"),
        report.Column("steps", 7),
        report.Column("status", 9, align="<", gap="  "),
        report.Column("schedule (step:lr)", align="<", gap=" "),
    )
    sign = -1 if summary.mode == "max" else 1
    ordered = sorted(summary.trials, key=lambda t: (t.diverged, sign * t.final_metric))
    return report.format_table(
        columns,
        [
            [
                t.trial_id,
                t.final_metric,
                t.best_metric,
                t.final_lr,
                t.steps,
                status(t, summary.best_trial),
                lineage.describe(t.schedule),
            ]
            for t in ordered
        ],
    )


def status(trial: TrialSummary, best_trial: str | None) -> str:
    return "diverged" if trial.diverged else "BEST" if trial.trial_id == best_trial else "ok"
