"""Figures a researcher looks at after a learning-rate sweep: discovered schedules and learning curves."""

from __future__ import annotations

from metaopt import report
from metaopt.pbt.lineage import Segments


def step_curve(history: Segments, total_steps: int) -> tuple[list[int], list[float]]:
    """x/y points of a piecewise-constant schedule, drawn as steps up to ``total_steps``."""
    xs, ys = [], []
    for i, (start, lr) in enumerate(history):
        end = history[i + 1][0] if i + 1 < len(history) else total_steps
        xs += [start, end]
        ys += [lr, lr]
    return xs, ys


def plot_schedules(schedules: dict[str, Segments], best: str | None, total_steps: int, title: str):
    """Every final trial's lineage learning rate vs optimizer step (log scale), the best one highlighted."""
    fig, ax = report.figure(size=(7, 4))
    for trial_id, history in sorted(schedules.items()):
        xs, ys = step_curve(history, total_steps)
        is_best = trial_id == best
        ax.plot(
            xs,
            ys,
            lw=2.5 if is_best else 1.0,
            alpha=1.0 if is_best else 0.5,
            color="C3" if is_best else None,
            label=f"{trial_id} (best)" if is_best else trial_id,
            zorder=3 if is_best else 2,
        )
    report.label_axes(ax, x="optimizer step", y="learning rate", title=title, legend=7, grid=False, log_y=True)
    fig.tight_layout()
    return fig


def plot_learning_curves(curves: dict[str, tuple[list[int], list[float]]], metric: str, best: str | None, title: str):
    """The sweep's metric per iteration for every trial (as reported, including exploit jumps)."""
    fig, ax = report.figure(size=(7, 4))
    for trial_id, (xs, ys) in sorted(curves.items()):
        is_best = trial_id == best
        ax.plot(xs, ys, marker=".", lw=2.0 if is_best else 1.0, alpha=1.0 if is_best else 0.6, label=trial_id)
    report.label_axes(ax, x="optimizer step", y=metric, title=title, legend=7, grid=False)
    fig.tight_layout()
    return fig
