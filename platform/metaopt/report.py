"""The end of every sweep, the part all capabilities share: trial rows read from Tune's results, rows grouped
and their curves averaged over seeds, the printed text table, CSV files, and matplotlib set up for files.

A capability's ``sweep.py`` keeps only what is its own: which values a row holds, how rows group, which columns
its table and CSV have, and which plots it draws (with :func:`figure` / :func:`label_axes`).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

Row = dict[str, Any]
Curve = tuple[list[Any], list[float]]
K = TypeVar("K", bound=Hashable)


# ---- trial rows -------------------------------------------------------------------------------------------------
def trial_id(result: Any) -> str:
    """The id of a Tune ``Result``'s trial (its folder when it never reported)."""
    return str((result.metrics or {}).get("trial_id", result.path))


def error_line(result: Any) -> str | None:
    """The first line of a failed trial's error; None when it did not fail."""
    return str(result.error).splitlines()[0] if result.error else None


def progress_curves(result: Any, wanted: Callable[[str], bool]) -> dict[str, list[float]]:
    """Every reported value of the ``wanted`` metrics of a trial, in order, as floats (NaN where a result did
    not carry it), from Tune's ``progress.csv`` (complete after restores; see :func:`metaopt.tracking.progress_rows`).
    Empty when the trial reported nothing."""
    from metaopt.tracking import progress_rows  # MLflow's import takes seconds; plots and tables need none of it

    frame = progress_rows(result.path)
    if frame is None or frame.empty:
        return {}
    return {key: frame[key].astype(float).tolist() for key in frame.columns if wanted(key)}


def measured(xs: Iterable[float], ys: Iterable[float]) -> Curve:
    """The (x, y) points where both were measured (neither NaN): a metric reported only every few iterations
    (an evaluation) next to its x axis."""
    pairs = [(x, y) for x, y in zip(xs, ys) if not (math.isnan(x) or math.isnan(y))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def grouped(rows: Iterable[Row], key: Callable[[Row], K]) -> dict[K, list[Row]]:
    """The rows by ``key`` (e.g. strategy and lr: the seeds of one setting), keys sorted, rows in their order."""
    groups: dict[K, list[Row]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return dict(sorted(groups.items()))


def mean_curve(curves: Sequence[tuple[Sequence[Any], Sequence[float]]]) -> Curve:
    """The mean over seeds of curves measured at the same points, cut to the shortest (a trial that stopped
    early), on the first curve's x. Empty curves are left out; ``([], [])`` when none is left."""
    curves = [(xs, ys) for xs, ys in curves if len(xs)]
    if not curves:
        return [], []
    length = min(len(xs) for xs, _ in curves)
    return list(curves[0][0][:length]), np.mean([list(ys[:length]) for _, ys in curves], axis=0).tolist()


def seed_std(values: Sequence[float], *, skip_nan: bool = False) -> float:
    """The sample standard deviation over seeds (ddof 1); 0.0 for a single seed. ``skip_nan``: over the
    seeds that have a value."""
    if len(values) < 2:
        return 0.0
    return float((np.nanstd if skip_nan else np.std)(values, ddof=1))


# ---- tables and CSV ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column of a printed table: its title, width (0: as wide as its text), alignment (``>`` numbers,
    ``<`` text), the format spec of its values (``.4f``, ``g``) and the text printed before it (``gap``)."""

    title: str
    width: int = 0
    spec: str = ""
    align: str = ">"
    gap: str = ""

    def cell(self, value: Any, spec: str | None = None) -> str:
        width = str(self.width) if self.width else ""
        return f"{self.gap}{format(value, f'{self.align}{width}{self.spec if spec is None else spec}')}"


def format_table(columns: Sequence[Column], rows: Iterable[Sequence[Any]], notes: Sequence[str] = ()) -> str:
    """The end-of-sweep table: a header of the columns' titles, a rule as long as the header, one line per row
    (its values in column order), then ``notes`` (lines that explain the figures)."""
    header = "".join(column.cell(column.title, "") for column in columns)
    lines = [header, "-" * len(header)]
    lines += ["".join(column.cell(value) for column, value in zip(columns, row, strict=True)) for row in rows]
    return "\n".join([*lines, *notes])


def csv_rows(rows: Iterable[Row], keys: Sequence[str]) -> list[list[Any]]:
    """The ``keys`` of every row, in order: the body of a CSV whose header is ``keys``."""
    return [[row[key] for key in keys] for row in rows]


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV file: ``header`` then ``rows`` (values as ``str`` gives them)."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---- figures ----------------------------------------------------------------------------------------------------
def figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (8, 4.5), squeeze: bool = True):
    """A new matplotlib figure and its axes (``plt.subplots``), drawn off-screen: sweeps run headless and their
    figures go to MLflow or files. Close it with :func:`save_figure` or ``ParentRun.log_figure``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=size, squeeze=squeeze)


def label_axes(
    ax: Any,
    *,
    x: str,
    y: str,
    title: str | None = None,
    title_size: float | None = None,
    legend: float | None = None,
    grid: bool = True,
    log_y: bool = False,
) -> None:
    """The labels every sweep plot has: x and y labels, a title, a light grid, a legend of ``legend`` points."""
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if title is not None:
        ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    if log_y:
        ax.set_yscale("log")
    if grid:
        ax.grid(alpha=0.3)
    if legend is not None:
        ax.legend(fontsize=legend, loc="best")


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure to ``path`` (the format from its suffix) and close it: sweeps draw many."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
