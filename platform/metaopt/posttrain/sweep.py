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
from collections import defaultdict
from typing import Any

import numpy as np

from metaopt import runtime, tracking
from metaopt.config import Experiment
from metaopt.session import fit_tracked, open_session


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
    print(f"[metaopt] {trials} GRPO post-training runs ({', '.join(section.curricula)} x seeds {section.seeds}) of "
          f"{model}, {section.steps} steps of {section.grpo.prompts_per_step} prompts x G={section.grpo.group_size}, "
          f"roles: {section.roles.mode}", flush=True)
    build = functools.partial(build_tuner, section)
    return fit_tracked(exp, session, build, metric="accuracy", iterations=section.iterations, trial_row=trial_row,
                       log_results=log_results, format_table=format_table, callbacks=callbacks, verbose=verbose,
                       started=started)


def check_trial_fits(section, per_trial: dict[str, float], resources: runtime.Resources) -> None:
    """One trial's placement group (trial process + learner + rollout + reference actors) must fit the cluster,
    or Tune would wait for it forever. Checked before anything is tracked."""
    from metaopt.errors import ConfigError
    from metaopt.posttrain.roles import role_bundles

    bundles = role_bundles(section, per_trial)
    for kind, available in (("CPU", resources.cpus), ("GPU", resources.gpus)):
        needed = sum(bundle[kind] for bundle in bundles)
        if needed > available + 1e-9:
            raise ConfigError("posttrain.roles", f"one trial needs {needed:g} {kind}s (ray.{kind.lower()}s_per_trial + "
                              f"the learner, {section.roles.rollout_workers} rollout and reference actors) but the "
                              f"cluster has {available:g}; lower roles.cpus_per_actor or use roles.mode: colocated")


def trial_row(result) -> dict[str, Any]:
    frame = tracking.progress_rows(result.path)
    config = result.config or {}
    curves: dict[str, list[float]] = {}
    if frame is not None and not frame.empty:
        for key in frame.columns:
            if key in ("accuracy", "reward", "grpo_step", "kl", "lr", "completions_per_s", "warmup_accuracy") or \
                    key.startswith(("p/", "accuracy/")):
                curves[key] = frame[key].astype(float).tolist()
    accuracy = [a for a in curves.get("accuracy", []) if not math.isnan(a)]
    warm = [a for a in curves.get("warmup_accuracy", []) if not math.isnan(a)]
    speed = [s for s in curves.get("completions_per_s", []) if not math.isnan(s)]
    return {
        "trial_id": str((result.metrics or {}).get("trial_id", result.path)),
        "curriculum": config.get("curriculum"), "seed": config.get("seed"),
        "warmup_accuracy": warm[0] if warm else math.nan,
        "final_accuracy": accuracy[-1] if accuracy else math.nan,
        "best_accuracy": max(accuracy) if accuracy else math.nan,
        "completions_per_s": float(np.mean(speed)) if speed else math.nan,
        "curves": curves,
        "error": str(result.error).splitlines()[0] if result.error else None,
    }


def grouped(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["curriculum"]].append(r)
    return dict(sorted(groups.items()))


def valid_curve(row: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """(GRPO step, value) pairs of the iterations where ``key`` was measured."""
    steps, values = row["curves"].get("grpo_step", []), row["curves"].get(key, [])
    pairs = [(s, v) for s, v in zip(steps, values) if not (math.isnan(s) or math.isnan(v))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def log_results(parent: tracking.ParentRun, rows: list[dict[str, Any]], exp: Experiment) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for curriculum, members in groups.items():
        curves = [valid_curve(m, "accuracy") for m in members]
        curves = [c for c in curves if c[0]]
        if not curves:
            continue
        length = min(len(c[0]) for c in curves)
        mean = np.mean([c[1][:length] for c in curves], axis=0)
        ax.plot(curves[0][0][:length], mean, marker="o", label=f"{curriculum} ({len(curves)} seeds)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("greedy accuracy (mean over categories)")
    ax.set_title(f"{exp.name}: accuracy per curriculum", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    parent.log_figure(fig, "accuracy.png")
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (curriculum, members) in zip(axes[0], groups.items()):
        first = members[0]
        for key in sorted(k for k in first["curves"] if k.startswith("p/")):
            ax.plot(*valid_curve(first, key), label=key[2:])
        ax.set_title(f"{curriculum} (seed {first['seed']})", fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("category probability")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    parent.log_figure(fig, "curriculum.png")
    metrics = {}
    for curriculum, members in groups.items():
        metrics[f"{curriculum}.final_accuracy"] = float(np.nanmean([m["final_accuracy"] for m in members]))
    parent.log_metrics(metrics)
    parent.log_csv("summary.csv", ["trial_id", "curriculum", "seed", "warmup_accuracy", "final_accuracy",
                                   "best_accuracy", "completions_per_s"],
                   [[r["trial_id"], r["curriculum"], r["seed"], r["warmup_accuracy"], r["final_accuracy"],
                     r["best_accuracy"], r["completions_per_s"]] for r in rows])


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'curriculum':<14}{'seeds':>6}{'warm-up acc':>13}{'final acc':>11}{'± std':>8}{'compl/s':>9}"
    lines = [header, "-" * len(header)]
    for curriculum, members in grouped(rows).items():
        finals = [m["final_accuracy"] for m in members]
        lines.append(f"{curriculum:<14}{len(members):>6}{np.nanmean([m['warmup_accuracy'] for m in members]):>13.4f}"
                     f"{np.nanmean(finals):>11.4f}{(np.nanstd(finals, ddof=1) if len(finals) > 1 else 0.0):>8.4f}"
                     f"{np.nanmean([m['completions_per_s'] for m in members]):>9.1f}")
    return "\n".join(lines)
