"""benchmarks/results.py: every benchmark appends its headline figures to one CSV; its rows must stay well formed."""

import csv
import datetime
import importlib.util
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_results_module():
    """benchmarks/ is not a package (its scripts run as files), so load the helper by its path."""
    spec = importlib.util.spec_from_file_location("benchmark_results", REPO / "benchmarks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results = load_results_module()


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_append_writes_the_header_once_then_one_row_per_call(tmp_path):
    path = tmp_path / "results.csv"
    day = datetime.date(2026, 12, 6)
    results.append(
        "pbt_overhead",
        "ratio",
        1.23456,
        "--skip-naive",
        path=path,
        commit="abc1234",
        machine="2 CPUs, Linux, Python 3.11",
        today=day,
    )
    results.append("fed_rounds", "ratio", 1.2, path=path, commit="", machine="1 CPUs, x, y", today=day)
    rows = read_rows(path)
    assert rows[0] == list(results.COLUMNS)
    assert rows[1] == [
        "2026-12-06",
        "abc1234",
        "2 CPUs, Linux, Python 3.11",
        "pbt_overhead",
        "ratio",
        "1.235",
        "--skip-naive",
    ]
    assert rows[2] == ["2026-12-06", "", "1 CPUs, x, y", "fed_rounds", "ratio", "1.2", ""]
    assert len(rows) == 3


def test_a_row_records_this_run_s_date_commit_and_machine(tmp_path):
    path = tmp_path / "nested.csv"
    row = results.append("symbolic_search", "hit_rate", 0.82, path=path)
    assert row["date"] == datetime.date.today().isoformat()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert row["commit"].removesuffix("-dirty") == head.stdout.strip()
    assert row["machine"].startswith(f"{os.cpu_count()} CPUs, ")
    assert read_rows(path)[1][:3] == [row["date"], row["commit"], row["machine"]]


def test_the_commit_is_empty_outside_a_git_checkout(tmp_path):
    assert results.current_commit(tmp_path) == ""


def test_values_keep_four_significant_digits_and_text_stays_as_written():
    assert results.format_value(0.123456) == "0.1235"
    assert results.format_value(2180.4) == "2180"
    assert results.format_value(7) == "7"
    assert results.format_value(float("nan")) == "nan"
    assert results.format_value("n/a") == "n/a"


def test_the_checked_in_history_is_well_formed():
    """benchmarks/results.csv (transcribed history plus appended runs): the seven columns in every row, ISO dates,
    a benchmark and a figure name, and a value that is a number."""
    rows = read_rows(REPO / "benchmarks" / "results.csv")
    assert rows[0] == list(results.COLUMNS)
    for row in rows[1:]:
        assert len(row) == len(results.COLUMNS), row
        record = dict(zip(results.COLUMNS, row))
        datetime.date.fromisoformat(record["date"])
        assert record["benchmark"] and record["figure"], row
        float(record["value"])
