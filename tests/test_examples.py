"""examples/ runs as the README says: every ``cd examples/X && metaopt run Y`` the README shows names a folder and
an experiment file that exist, and each file validates from its own folder (which imports the user's modules and
calls each factory once, as ``metaopt run`` does before Ray starts). Running them end to end is the seam tests'
job (tests/test_user_tasks.py runs examples/own_task as a user would)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from metaopt import config

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"cd (examples/[\w-]+) && metaopt run ([\w.-]+\.ya?ml)")


def readme_commands() -> list[tuple[str, str]]:
    return sorted(set(COMMAND.findall((ROOT / "README.md").read_text())))


def test_the_readme_shows_one_example_per_folder_under_examples():
    shown = {folder for folder, _ in readme_commands()}
    folders = {f"examples/{path.name}" for path in (ROOT / "examples").iterdir() if path.is_dir()}
    assert shown == folders and len(shown) >= 4


@pytest.mark.parametrize("folder, experiment", readme_commands())
def test_each_example_validates_from_its_own_folder(folder, experiment, monkeypatch):
    where = ROOT / folder
    assert (where / experiment).is_file(), f"README runs {folder}/{experiment}, which does not exist"
    assert (where / "README.md").is_file(), f"{folder} has no README.md"
    monkeypatch.chdir(where)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("METAOPT_USER_DIR", raising=False)
    try:
        loaded = config.load(experiment)  # check_paths: imports, signatures, one call of each factory
    finally:
        forget_modules_under(where)  # the examples' modules (tasks, data, model, ...) must not answer other tests
    assert loaded.name and loaded.kind in {"pbt", "federated", "lpo", "lpo_eval", "posttrain", "symbolic"}


def forget_modules_under(folder: Path) -> None:
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]
