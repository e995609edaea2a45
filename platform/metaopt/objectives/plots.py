"""Figures for learned objectives: drift heat-maps over (ratio, advantage) and meta-training curves.

The heat-maps are the view of Lu et al. 2022 (Fig. 2) and Jackson et al. ICLR 2024 (Fig. 3): the drift a policy
pays for moving its probability ratio away from 1 given the (normalised) advantage, at several points of
training (TA-LPO's drift changes with the progress n/N; LPO's, PPO's and DPO's do not).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from metaopt import report

RATIO_RANGE = (0.0, 2.0)
ADVANTAGE_RANGE = (-3.0, 3.0)


def drift_grid(
    drift_fn: Callable, params: Any, fraction: float, log_horizon: float, resolution: int = 101
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drift values on a ratio x advantage grid (ratios start just above 0, where log r is defined)."""
    import jax.numpy as jnp

    from metaopt.objectives.drifts import Progress

    ratios = np.linspace(max(RATIO_RANGE[0], 1e-3), RATIO_RANGE[1], resolution, dtype=np.float32)
    advantages = np.linspace(*ADVANTAGE_RANGE, resolution, dtype=np.float32)
    r, a = np.meshgrid(ratios, advantages)
    progress = Progress(jnp.float32(fraction), jnp.float32(log_horizon))
    values = np.asarray(drift_fn(params, jnp.asarray(r), jnp.asarray(a), progress))
    return ratios, advantages, values


def plot_drift_heatmaps(
    objectives: dict[str, tuple[Callable, Any]], fractions: list[float], log_horizon: float, title: str
):
    """One row per objective, one column per training-progress value; a shared colour scale per row."""
    rows, cols = len(objectives), max(1, len(fractions))
    fig, axes = report.figure(rows, cols, size=(3.2 * cols + 1, 2.8 * rows + 0.6), squeeze=False)
    for row, (name, (drift_fn, params)) in enumerate(objectives.items()):
        grids = [drift_grid(drift_fn, params, f, log_horizon) for f in fractions]
        top = max(float(np.nanmax(g[2])) for g in grids) or 1.0
        for col, (fraction, (ratios, advantages, values)) in enumerate(zip(fractions, grids)):
            ax = axes[row][col]
            image = ax.imshow(
                values,
                origin="lower",
                aspect="auto",
                cmap="viridis",
                vmin=0.0,
                vmax=top,
                extent=(ratios[0], ratios[-1], advantages[0], advantages[-1]),
            )
            ax.axvline(1.0, color="white", lw=0.6, ls="--")
            ax.axhline(0.0, color="white", lw=0.6, ls="--")
            ax.set_title(f"{name}, n/N = {fraction:g}", fontsize=9)
            ax.set_xlabel("ratio r")
            if col == 0:
                ax.set_ylabel("advantage Â")
        fig.colorbar(image, ax=list(axes[row]), shrink=0.85, label="drift")
    fig.suptitle(f"{title} (log N = {log_horizon:.2f})", fontsize=10)
    return fig


def plot_meta_curves(curves: dict[str, dict[str, Any]], best: str | None, title: str):
    """Per trial: population mean fitness per generation and the ES-mean evaluation score."""
    fig, axes = report.figure(1, 2, size=(10, 3.6))
    for trial, series in curves.items():
        width = 2.2 if trial == best else 1.0
        for ax, key in zip(axes, ("fitness_mean", "mean_score")):
            xs, ys = series.get(key) or ([], [])
            points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
            if points:
                ax.plot(*zip(*points), lw=width, marker="o" if key == "mean_score" else None, ms=3, label=trial)
    for trial, series in curves.items():
        start = series.get("start_mean_score")
        if start is not None and math.isfinite(start):
            axes[1].axhline(start, color="tab:red", lw=0.8, ls="--", label=f"{trial}: generation 0 (PPO)")
    for ax, label in zip(axes, ("population mean fitness (return / PPO's)", "ES mean: eval score (return / PPO's)")):
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("generation")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_eval_bars(table: list[dict[str, Any]], title: str):
    """Mean final return with its confidence interval, per objective, one panel per env/horizon."""
    problems = sorted({row["problem"] for row in table})
    fig, axes = report.figure(1, len(problems), size=(3.4 * len(problems) + 0.5, 3.4), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        rows = [r for r in table if r["problem"] == problem]
        names = [r["objective"] for r in rows]
        means = np.array([r["mean"] for r in rows])
        errors = np.array([[r["mean"] - r["ci_low"] for r in rows], [r["ci_high"] - r["mean"] for r in rows]])
        ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(problem, fontsize=9)
        ax.set_ylabel("final mean return")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
