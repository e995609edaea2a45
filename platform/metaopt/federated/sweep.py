"""The ``federated`` experiment: Ray -> Tune (strategy x initial lr x seed, a round per iteration) -> MLflow.

The parent run gets ``accuracy.png`` (accuracy vs round, one line per strategy and lr, mean over seeds),
``learning_rates.png`` (global and local lr vs round) and ``summary.csv``; each trial's child run has its
per-round metrics (accuracy, loss, global lr, client lrs, participants, failed clients).
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from typing import Any

import numpy as np

from metaopt import tracking
from metaopt.config import Experiment
from metaopt.session import fit_tracked, open_session


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
            raise ConfigError("federated.num_clients", f"{section.num_clients} clients need at least "
                              f"{2 * section.num_clients} samples; {section.dataset} has {samples}")
    session = open_session(exp, address, "federated", verbose)
    trials = len(section.strategies) * len(section.lrs) * len(section.seeds)
    print(f"[metaopt] {trials} federated trainings ({', '.join(section.strategies)} x lrs {section.lrs} x seeds "
          f"{section.seeds}), {section.num_clients} client actors each, {section.rounds} rounds", flush=True)
    build = functools.partial(build_tuner, section)
    return fit_tracked(exp, session, build, metric="accuracy", iterations=section.rounds, trial_row=trial_row,
                       log_results=log_results, format_table=format_table, callbacks=callbacks, verbose=verbose,
                       started=started)


def trial_row(result) -> dict[str, Any]:
    frame = tracking.progress_rows(result.path)
    config = result.config or {}
    curves = {}
    if frame is not None and not frame.empty:
        for key in ("accuracy", "global_lr", "client_lr", "client_lr_mean_used", "failed_clients"):
            if key in frame:
                curves[key] = frame[key].astype(float).tolist()
        curves["round"] = frame["round"].astype(int).tolist()
    accuracy = curves.get("accuracy", [])
    return {
        "trial_id": str((result.metrics or {}).get("trial_id", result.path)),
        "strategy": config.get("strategy"), "lr": config.get("lr"), "seed": config.get("seed"),
        "final_accuracy": accuracy[-1] if accuracy else math.nan,
        "best_accuracy": max(accuracy) if accuracy else math.nan,
        "failed_clients": int(sum(curves.get("failed_clients", []))),
        "curves": curves,
        "error": str(result.error).splitlines()[0] if result.error else None,
    }


def grouped(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["strategy"], r["lr"])].append(r)
    return dict(sorted(groups.items()))


def mean_curve(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    curves = [r["curves"][key] for r in rows if key in r["curves"]]
    if not curves:
        return [], []
    length = min(len(c) for c in curves)
    return list(range(1, length + 1)), np.mean([c[:length] for c in curves], axis=0).tolist()


def log_results(parent: tracking.ParentRun, rows: list[dict[str, Any]], exp: Experiment) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (strategy, lr), members in groups.items():
        ax.plot(*mean_curve(members, "accuracy"), label=f"{strategy}, lr0 {lr:g} ({len(members)} seeds)")
    ax.set_xlabel("round")
    ax.set_ylabel("validation accuracy (global model)")
    ax.set_title(f"{exp.name}: accuracy per strategy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    parent.log_figure(fig, "accuracy.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (strategy, lr), members in groups.items():
        axes[0].plot(*mean_curve(members, "global_lr"), label=f"{strategy}, lr0 {lr:g}")
        axes[1].plot(*mean_curve(members, "client_lr_mean_used"), label=f"{strategy}, lr0 {lr:g}")
    for ax, label in zip(axes, ("global (server) lr", "local lr (mean over clients and batches)")):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    parent.log_figure(fig, "learning_rates.png")
    metrics = {}
    for (strategy, lr), members in groups.items():
        metrics[f"{strategy}.lr{lr:g}.final_accuracy"] = float(np.mean([m["final_accuracy"] for m in members]))
    metrics["failed_client_rounds"] = sum(r["failed_clients"] for r in rows)
    parent.log_metrics(metrics)
    parent.log_csv("summary.csv", ["trial_id", "strategy", "lr", "seed", "final_accuracy", "best_accuracy",
                                   "failed_clients"],
                   [[r["trial_id"], r["strategy"], r["lr"], r["seed"], r["final_accuracy"], r["best_accuracy"],
                     r["failed_clients"]] for r in rows])


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'strategy':<16}{'lr0':>8}{'seeds':>7}{'final acc':>11}{'± std':>8}{'best acc':>10}"
    lines = [header, "-" * len(header)]
    for (strategy, lr), members in grouped(rows).items():
        finals = [m["final_accuracy"] for m in members]
        lines.append(f"{strategy:<16}{lr:>8g}{len(members):>7}{np.mean(finals):>11.4f}"
                     f"{(np.std(finals, ddof=1) if len(finals) > 1 else 0.0):>8.4f}"
                     f"{np.mean([m['best_accuracy'] for m in members]):>10.4f}")
    return "\n".join(lines)
