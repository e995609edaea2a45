"""The ``federated`` experiment: Ray -> Tune (strategy x initial lr x seed, a round per iteration) -> MLflow.

The parent run gets ``accuracy.png`` (accuracy vs round, one line per strategy and lr, mean over seeds),
``learning_rates.png`` (global and local lr vs round) and ``summary.csv``; each trial's child run has its
per-round metrics (accuracy, loss, global lr, client lrs, participants, failed clients).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from metaopt import report, tracking
from metaopt.config import Experiment
from metaopt.session import fit_tracked, open_session

CURVES = ("accuracy", "global_lr", "client_lr", "client_lr_mean_used", "client_lr_factor", "failed_clients", "round")
SUMMARY_COLUMNS = [
    "trial_id",
    "strategy",
    "lr",
    "seed",
    "final_accuracy",
    "best_accuracy",
    "rounds_to_target",
    "final_global_lr",
    "failed_clients",
]
TABLE = (
    report.Column("strategy", 16, align="<"),
    report.Column("lr0", 8, "g"),
    report.Column("seeds", 7),
    report.Column("final acc", 11, ".4f"),
    report.Column("± std", 8, ".4f"),
    report.Column("best acc", 10, ".4f"),
)


def run(exp: Experiment, *, address: str | None = None, callbacks: list[Any] | None = None, verbose: int = 1):
    from metaopt.federated.tune import build_tuner

    started = time.time()
    section = exp.section
    if section.dataset in ("fashion_mnist", "cifar10"):
        from metaopt.errors import ConfigError
        from metaopt.federated.data import load_dataset

        try:  # here, before any trial starts: a missing path is one clear error, not a failed trial per grid point
            samples = len(load_dataset(section.dataset, section.data_root).y)
        except ConfigError as err:
            raise ConfigError(f"federated.{err.field}", err.problem) from None
        if 2 * section.num_clients > samples:
            raise ConfigError(
                "federated.num_clients",
                f"{section.num_clients} clients need at least "
                f"{2 * section.num_clients} samples; {section.dataset} has {samples}",
            )
    session = open_session(exp, address, "federated", verbose)
    trials = len(section.strategies) * len(section.lrs) * len(section.seeds)
    print(
        f"[metaopt] {trials} federated trainings ({', '.join(section.strategies)} x lrs {section.lrs} x seeds "
        f"{section.seeds}), {section.num_clients} client actors each, {section.rounds} rounds",
        flush=True,
    )
    build = functools.partial(build_tuner, section)
    return fit_tracked(
        exp,
        session,
        build,
        metric="accuracy",
        iterations=section.rounds,
        trial_row=trial_row,
        log_results=log_results,
        format_table=format_table,
        callbacks=callbacks,
        verbose=verbose,
        started=started,
    )


def trial_row(result) -> dict[str, Any]:
    curves: dict[str, list] = report.progress_curves(result, CURVES.__contains__)
    if curves:
        curves["round"] = [int(r) for r in curves["round"]]
    config = result.config or {}
    accuracy = curves.get("accuracy", [])
    return {
        "trial_id": report.trial_id(result),
        "strategy": config.get("strategy"),
        "lr": config.get("lr"),
        "seed": config.get("seed"),
        "final_accuracy": accuracy[-1] if accuracy else math.nan,
        "best_accuracy": max(accuracy) if accuracy else math.nan,
        "failed_clients": int(sum(curves.get("failed_clients", []))),
        "final_global_lr": curves["global_lr"][-1] if curves.get("global_lr") else math.nan,
        "rounds_to_target": rounds_to_target(accuracy, (config.get("exp") or {}).get("target_accuracy")),
        "curves": curves,
        "error": report.error_line(result),
    }


def rounds_to_target(accuracy: Sequence[float], target: float | None) -> float:
    """The first round (1-based) whose accuracy reaches ``target`` -- FedHyper's speed measure (Wang et al., ICLR
    2024, Sec. 5: rounds to a target accuracy) -- or, censored, one past the last round when none does; NaN
    without a target or a curve."""
    if target is None or not len(accuracy):
        return math.nan
    return float(next((i for i, a in enumerate(accuracy, start=1) if a >= target), len(accuracy) + 1))


def setting(row: dict[str, Any]) -> tuple[str, float]:
    """The seeds of one strategy and initial lr form a group."""
    return row["strategy"], row["lr"]


def per_round(members: list[dict[str, Any]], key: str) -> report.Curve:
    """A curve's mean over the seeds, against rounds 1, 2, ..."""
    curves = [m["curves"][key] for m in members if key in m["curves"]]
    return report.mean_curve([(range(1, len(c) + 1), c) for c in curves])


def log_results(parent: tracking.ParentRun, rows: list[dict[str, Any]], exp: Experiment) -> None:
    groups = report.grouped(rows, setting)
    fig, ax = report.figure(size=(8, 4.5))
    for (strategy, lr), members in groups.items():
        ax.plot(*per_round(members, "accuracy"), label=f"{strategy}, lr0 {lr:g} ({len(members)} seeds)")
    report.label_axes(
        ax,
        x="round",
        y="validation accuracy (global model)",
        title=f"{exp.name}: accuracy per strategy",
        title_size=10,
        legend=7,
    )
    fig.tight_layout()
    parent.log_figure(fig, "accuracy.png")
    fig, axes = report.figure(1, 2, size=(11, 4))
    for (strategy, lr), members in groups.items():
        axes[0].plot(*per_round(members, "global_lr"), label=f"{strategy}, lr0 {lr:g}")
        axes[1].plot(*per_round(members, "client_lr_mean_used"), label=f"{strategy}, lr0 {lr:g}")
    report.label_axes(axes[0], x="round", y="global (server) lr", log_y=True)
    report.label_axes(axes[1], x="round", y="local lr (mean over clients and batches)", log_y=True, legend=7)
    fig.tight_layout()
    parent.log_figure(fig, "learning_rates.png")
    metrics = {
        f"{strategy}.lr{lr:g}.final_accuracy": float(np.mean([m["final_accuracy"] for m in members]))
        for (strategy, lr), members in groups.items()
    }
    metrics["failed_client_rounds"] = sum(r["failed_clients"] for r in rows)
    parent.log_metrics(metrics)
    parent.log_csv("summary.csv", SUMMARY_COLUMNS, report.csv_rows(rows, SUMMARY_COLUMNS))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Per strategy and initial lr: the final accuracy's mean and spread over seeds, the best accuracy's mean."""
    lines = []
    for (strategy, lr), members in report.grouped(rows, setting).items():
        finals = [m["final_accuracy"] for m in members]
        lines.append(
            [
                strategy,
                lr,
                len(members),
                np.mean(finals),
                report.seed_std(finals),
                np.mean([m["best_accuracy"] for m in members]),
            ]
        )
    return report.format_table(TABLE, lines)
