"""The ``posttrain`` experiment: Ray -> Tune (curriculum x seed; GRPO steps per iteration) -> MLflow.

The parent run gets ``accuracy.png`` (greedy accuracy vs GRPO step per curriculum, mean over seeds),
``curriculum.png`` (each curriculum's category probabilities over training, first seed) and ``summary.csv``;
each trial's child run has per-iteration reward, accuracy per category, curriculum probabilities, KL,
completions/s and, as text artifacts, sample completions.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import numpy as np

from metaopt import report, runtime, tracking
from metaopt.config import Experiment
from metaopt.session import fit_tracked, open_session

CURVES = ("accuracy", "reward", "grpo_step", "kl", "lr", "completions_per_s", "warmup_accuracy")
SUMMARY_COLUMNS = [
    "trial_id",
    "curriculum",
    "seed",
    "warmup_accuracy",
    "final_accuracy",
    "best_accuracy",
    "completions_per_s",
]
TABLE = (
    report.Column("curriculum", 14, align="<"),
    report.Column("seeds", 6),
    report.Column("warm-up acc", 13, ".4f"),
    report.Column("final acc", 11, ".4f"),
    report.Column("± std", 8, ".4f"),
    report.Column("compl/s", 9, ".1f"),
)


def run(exp: Experiment, *, address: str | None = None, callbacks: list[Any] | None = None, verbose: int = 1):
    from metaopt.posttrain.config import check_model_path
    from metaopt.posttrain.tune import build_tuner

    started = time.time()
    section = exp.section
    check_model_path(section)
    resources = runtime.init(exp.ray, address)  # open_session reuses this connection
    check_trial_fits(section, runtime.trial_resources(exp.ray, resources), resources)
    session = open_session(exp, address, "posttrain", verbose)
    trials = len(section.curricula) * len(section.seeds)
    model = section.model.path or f"tiny {section.model.arch} ({section.model.layers}x{section.model.hidden})"
    print(
        f"[metaopt] {trials} GRPO post-training runs ({', '.join(section.curricula)} x seeds {section.seeds}) of "
        f"{model} on {problems_line(section)}, {section.steps} steps of {section.grpo.prompts_per_step} prompts "
        f"x G={section.grpo.group_size}, "
        f"roles: {section.roles.mode}",
        flush=True,
    )
    build = functools.partial(build_tuner, section)
    return fit_tracked(
        exp,
        session,
        build,
        metric="accuracy",
        iterations=section.iterations,
        trial_row=trial_row,
        log_results=log_results,
        format_table=format_table,
        callbacks=callbacks,
        verbose=verbose,
        started=started,
    )


def problems_line(section) -> str:
    """What the policy is trained on, for the start line: the dataset's file and categories, or the tasks."""
    if section.dataset is not None:
        from pathlib import Path

        from metaopt.posttrain.dataset import read_dataset, split_dataset

        data = read_dataset(section.dataset)
        split = split_dataset(section.dataset, data)
        sizes = ", ".join(f"{c} {len(split.train[c])}/{len(split.held_out[c])}" for c in data.categories)
        reward = section.dataset.reward or "exact match"
        return (
            f"{Path(section.dataset.path).name} (categories {', '.join(data.categories)}; train/held-out rows "
            f"{sizes}, split_seed {section.dataset.split_seed}; reward {reward})"
        )
    return "tasks " + ", ".join(task.category_prefix for task in section.tasks)


def check_trial_fits(section, per_trial: dict[str, float], resources: runtime.Resources) -> None:
    """One trial's placement group (trial process + learner + rollout + reference actors) must fit the cluster,
    or Tune would wait for it forever. Checked before anything is tracked."""
    from metaopt.errors import ConfigError
    from metaopt.posttrain.roles import role_bundles

    bundles = role_bundles(section, per_trial)
    for kind, available in (("CPU", resources.cpus), ("GPU", resources.gpus)):
        needed = sum(bundle[kind] for bundle in bundles)
        if needed > available + 1e-9:
            raise ConfigError(
                "posttrain.roles",
                f"one trial needs {needed:g} {kind}s (ray.{kind.lower()}s_per_trial + "
                f"the learner, {section.roles.rollout_workers} rollout and reference actors) but the "
                f"cluster has {available:g}; lower roles.cpus_per_actor or use roles.mode: colocated",
            )


def is_curve(key: str) -> bool:
    """The reported metrics a row keeps per iteration: the scalars, and accuracy and probability per category."""
    return key in CURVES or key.startswith(("p/", "accuracy/"))


def trial_row(result) -> dict[str, Any]:
    curves = report.progress_curves(result, is_curve)
    config = result.config or {}
    accuracy = [a for a in curves.get("accuracy", []) if not math.isnan(a)]
    warm = [a for a in curves.get("warmup_accuracy", []) if not math.isnan(a)]
    speed = [s for s in curves.get("completions_per_s", []) if not math.isnan(s)]
    return {
        "trial_id": report.trial_id(result),
        "curriculum": config.get("curriculum"),
        "seed": config.get("seed"),
        "warmup_accuracy": warm[0] if warm else math.nan,
        "final_accuracy": accuracy[-1] if accuracy else math.nan,
        "best_accuracy": max(accuracy) if accuracy else math.nan,
        "completions_per_s": float(np.mean(speed)) if speed else math.nan,
        "curves": curves,
        "error": report.error_line(result),
    }


def valid_curve(row: dict[str, Any], key: str) -> report.Curve:
    """(GRPO step, value) pairs of the iterations where ``key`` was measured."""
    return report.measured(row["curves"].get("grpo_step", []), row["curves"].get(key, []))


def curriculum(row: dict[str, Any]) -> str:
    return row["curriculum"]


def log_results(parent: tracking.ParentRun, rows: list[dict[str, Any]], exp: Experiment) -> None:
    groups = report.grouped(rows, curriculum)
    fig, ax = report.figure(size=(8, 4.5))
    for name, members in groups.items():
        curves = [c for c in (valid_curve(m, "accuracy") for m in members) if c[0]]
        if curves:
            ax.plot(*report.mean_curve(curves), marker="o", label=f"{name} ({len(curves)} seeds)")
    report.label_axes(
        ax,
        x="GRPO step",
        y="greedy accuracy (mean over categories)",
        title=f"{exp.name}: accuracy per curriculum",
        title_size=10,
        legend=8,
    )
    fig.tight_layout()
    parent.log_figure(fig, "accuracy.png")
    fig, axes = report.figure(1, len(groups), size=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (name, members) in zip(axes[0], groups.items()):
        first = members[0]
        for key in sorted(k for k in first["curves"] if k.startswith("p/")):
            ax.plot(*valid_curve(first, key), label=key[2:])
        report.label_axes(ax, x="GRPO step", y="", title=f"{name} (seed {first['seed']})", title_size=9)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("category probability")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    parent.log_figure(fig, "curriculum.png")
    parent.log_metrics(
        {
            f"{name}.final_accuracy": float(np.nanmean([m["final_accuracy"] for m in members]))
            for name, members in groups.items()
        }
    )
    parent.log_csv("summary.csv", SUMMARY_COLUMNS, report.csv_rows(rows, SUMMARY_COLUMNS))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Per curriculum, means over the seeds that have a value: warm-up and final accuracy (with its spread) and
    completions per second."""
    lines = []
    for name, members in report.grouped(rows, curriculum).items():
        finals = [m["final_accuracy"] for m in members]
        lines.append(
            [
                name,
                len(members),
                np.nanmean([m["warmup_accuracy"] for m in members]),
                np.nanmean(finals),
                report.seed_std(finals, skip_nan=True),
                np.nanmean([m["completions_per_s"] for m in members]),
            ]
        )
    return report.format_table(TABLE, lines)
