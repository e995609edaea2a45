"""The benchmarks' history: each script appends its headline figure(s) to ``benchmarks/results.csv`` just before
its last line (``ratio: X.XX``), so that line stays last.

A figure means little without when, on which code and on which machine it was measured (this machine's speed
drifts by up to 2x between sessions), so every row carries all three. ``benchmarks/README.md`` shows the latest
figure per benchmark; this file keeps every one of them.

    from results import append   # benchmarks/ is on sys.path when a script here runs
    append("pbt_overhead", "ratio", ratio, notes="--skip-naive")
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("results.csv")
COLUMNS = ("date", "commit", "machine", "benchmark", "figure", "value", "notes")


def current_commit(repo: Path = RESULTS.parent) -> str:
    """The short commit of ``repo``'s HEAD, with ``-dirty`` when tracked files differ from it (the figure was then
    measured on uncommitted code); empty outside a git checkout or without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=repo, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")


def gpu_name() -> str:
    """The first CUDA device's name as torch sees it; empty without torch or a GPU (a JAX-only benchmark then pays
    torch's import once, at its end)."""
    try:
        import torch
    except ImportError:
        return ""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


def describe_machine() -> str:
    """CPU count, OS and Python, and the GPU if there is one: enough to tell which rows are comparable."""
    parts = [f"{os.cpu_count()} CPUs", platform.platform(terse=True), f"Python {platform.python_version()}"]
    gpu = gpu_name()
    return ", ".join(parts + ([gpu] if gpu else []))


def format_value(value: float | int | str) -> str:
    """Floats to 4 significant digits (the benchmarks' noise is percents), everything else as written."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def make_row(
    benchmark: str,
    figure: str,
    value: float | int | str,
    notes: str = "",
    *,
    commit: str | None = None,
    machine: str | None = None,
    today: datetime.date | None = None,
) -> dict[str, str]:
    """One row of ``results.csv``; commit, machine and date default to this run's."""
    return {
        "date": (today or datetime.date.today()).isoformat(),
        "commit": current_commit() if commit is None else commit,
        "machine": describe_machine() if machine is None else machine,
        "benchmark": benchmark,
        "figure": figure,
        "value": format_value(value),
        "notes": notes,
    }


def append(
    benchmark: str, figure: str, value: float | int | str, notes: str = "", path: Path = RESULTS, **row_fields
) -> dict[str, str]:
    """Append one measured figure to the CSV at ``path`` (header first when the file is new or empty) and return
    the row. ``row_fields`` (commit, machine, today) override what this run would record, for tests."""
    row = make_row(benchmark, figure, value, notes, **row_fields)
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(f"[results] {benchmark}: {figure} = {row['value']} appended to {path.name}", flush=True)
    return row


def command_line(argv: list[str] | None) -> str:
    """The options a benchmark ran with, for the notes column (a --quick run is not a full one)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(args)
