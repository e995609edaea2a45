"""metaopt.registry: kinds come from entry points or register(), each once; config and cli name no capability.

Packaging problems (a kind defined twice, an entry point that does not load or names the wrong thing) and a
missing extra are one ``metaopt: error:`` line with exit 2, like every bad input. No Ray starts here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import yaml

from example_kind.config import CAPABILITY as LINEFIT
from example_kind.config import LOSS, LineFitSection
from metaopt import cli, config, extras, registry
from metaopt.config import StrictModel
from metaopt.errors import ConfigError
from metaopt.registry import Capability, Command

SYMBOLIC = "metaopt.symbolic.config:CAPABILITY"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "platform" / "metaopt"
KIND_FOLDERS = {
    "pbt": "pbt",
    "federated": "federated",
    "lpo": "objectives",
    "lpo_eval": "objectives",
    "symbolic": "symbolic",
    "posttrain": "posttrain",
}  # kind -> its folder


@pytest.fixture
def register():
    """register(capability) for this test only."""
    added = []

    def add(capability: Capability) -> Capability:
        added.append(registry.register(capability).kind)
        return capability

    yield add
    for kind in added:
        registry.unregister(kind)


@pytest.fixture
def entry_points(monkeypatch):
    """Replace the built-in kinds and the installed entry points by the given entry points (the registry reads
    them once per process, and keeps what it loaded)."""

    def install(*points: tuple[str, str]) -> None:
        fake = [importlib.metadata.EntryPoint(name, value, registry.ENTRY_POINT_GROUP) for name, value in points]
        monkeypatch.setattr(registry, "BUILT_IN", {})
        monkeypatch.setattr(
            importlib.metadata, "entry_points", lambda group: [point for point in fake if point.group == group]
        )
        monkeypatch.setattr(registry, "_loaded", {})
        registry._entry_points.cache_clear()

    yield install
    registry._entry_points.cache_clear()


def write(tmp_path: Path, kind: str, section: dict | None = None) -> str:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"name": "e", "kind": kind, kind: section or {}}))
    return str(path)


def error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, (out, err)
    return err.rstrip("\n")


# ------------------------------------------------------------------------------------------ the built-in kinds


def test_every_built_in_kind_is_found_through_the_built_in_table():
    assert set(KIND_FOLDERS) <= set(registry.kinds())
    for kind, folder in KIND_FOLDERS.items():
        capability = registry.get(kind)
        assert capability.kind == kind and issubclass(capability.section, StrictModel)
        module = capability.runner.split(":")[0]
        assert module.startswith(f"metaopt.{folder}.") and importlib.util.find_spec(module) is not None
    assert registry.get("posttrain").extra == "posttrain"
    assert [command.name for command in registry.get("pbt").commands] == ["replay"]


def test_built_in_kinds_need_no_installed_metadata(monkeypatch):
    """A job whose code Ray ships to a cluster without metaopt installed (py_modules) has no entry points."""
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    registry._entry_points.cache_clear()
    try:
        assert set(KIND_FOLDERS) == set(registry.kinds())
        assert registry.get("pbt").kind == "pbt"
    finally:
        registry._entry_points.cache_clear()


def test_a_broken_plugin_does_not_stop_the_others_providing(entry_points, capsys):
    entry_points(("broken", "example_kind.no_such_module:CAPABILITY"), ("symbolic", SYMBOLIC))
    failures = registry.load_providers()
    assert [err.field for err in failures] == ["kind"] and "'broken' cannot be loaded" in str(failures[0])
    assert "[metaopt] warning: kind: capability 'broken'" in capsys.readouterr().err


def test_every_capability_folder_s_config_ends_in_its_capability():
    for kind, folder in KIND_FOLDERS.items():
        source = (PACKAGE_DIR / folder / "config.py").read_text()
        assert "register_kind" not in source
        assert f'kind="{kind}"' in source


@pytest.mark.parametrize("module", ["config", "cli"])
def test_config_and_cli_import_no_capability(module):
    tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {
        f"metaopt.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "metaopt"
        for alias in node.names
    }
    folders = set(KIND_FOLDERS.values())
    assert not {name for name in imported if name.startswith("metaopt.") and name.split(".")[1] in folders}


def test_the_help_lists_every_capability_verb(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    commands = cli.capability_commands()
    assert "replay" in [command.name for command in commands]
    for command in commands:
        assert f"{command.name} {command.help}" in text


# -------------------------------------------------------------------------------------------------- register()


def test_a_kind_registers_once(register):
    register(LINEFIT)
    assert "linefit" in registry.kinds() and registry.get("linefit") is LINEFIT
    with pytest.raises(ValueError, match="'linefit' is already registered"):
        registry.register(LINEFIT)
    with pytest.raises(ValueError, match="'pbt' is already registered"):  # an entry point's kind too
        registry.register(Capability(kind="pbt", section=LineFitSection, runner="example_kind.fit:run"))
    registry.unregister("linefit")
    assert "linefit" not in registry.kinds()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Capability(kind="Line-Fit", section=LineFitSection, runner="a.b:c"), "kind must match"),
        (lambda: Capability(kind="linefit", section=dict, runner="a.b:c"), "section must be a pydantic model class"),
        (
            lambda: Capability(kind="linefit", section=LineFitSection, runner="a.b.c"),
            "runner must be 'module:function'",
        ),
        (
            lambda: Capability(kind="linefit", section=LineFitSection, runner="a:b", commands=(LOSS, LOSS)),
            "command names repeat",
        ),
        (lambda: Command(name="Loss Of", help="", add_arguments=print, handler="a:b"), "command name must match"),
        (lambda: Command(name="loss", help="", add_arguments=print, handler="a"), "handler must be 'module:function'"),
    ],
)
def test_a_malformed_capability_is_refused_when_it_is_defined(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_missing_extra_is_one_line_before_the_section_is_read(register, monkeypatch, tmp_path, capsys):
    register(Capability(kind="needs_extra", section=LineFitSection, runner="example_kind.fit:run", extra="posttrain"))
    path = write(tmp_path, "needs_extra", {"lr": 5})
    monkeypatch.setitem(extras.EXTRAS, "posttrain", ("metaopt_no_such_module",))
    assert cli.main(["run", path]) == 2
    assert error_line(capsys) == (
        "metaopt: error: needs_extra: needs the optional dependencies of metaopt-platform[posttrain] "
        "(metaopt_no_such_module is not installed): pip install 'metaopt-platform[posttrain]'"
    )
    # submit and list check the file for a cluster, which has its own packages: no extra needed here
    (tmp_path / "ok").mkdir()
    ok = write(tmp_path / "ok", "needs_extra", {"lr": 0.5})
    assert config.load(ok, check_paths=False).kind == "needs_extra"
    monkeypatch.undo()  # the extra installed again: now the section is read, and its own error shows
    assert cli.main(["run", path]) == 2
    assert error_line(capsys).startswith("metaopt: error: needs_extra.lr: Input should be less than 1")


@pytest.mark.parametrize("name", ["run", "list"])
def test_a_verb_may_not_take_the_name_of_another(register, capsys, name):
    register(
        Capability(
            kind="clash",
            section=LineFitSection,
            runner="example_kind.fit:run",
            commands=(Command(name=name, help="", add_arguments=print, handler="a:b"),),
        )
    )
    assert cli.main(["status", "job"]) == 2
    assert (
        error_line(capsys)
        == f"metaopt: error: {name}: a capability's command has the name of another command; rename it"
    )


def test_two_capabilities_may_not_add_the_same_verb():
    with pytest.raises(ConfigError, match="linefit-loss: a capability's command has the name of another"):
        cli.build_parser(commands=[LOSS, LOSS])


# ------------------------------------------------------------------------------------------------ entry points


def test_a_kind_from_an_entry_point_runs_like_a_built_in(entry_points, tmp_path, capsys):
    entry_points(("linefit", "example_kind.config:CAPABILITY"))
    assert registry.kinds() == ["linefit"]
    assert cli.main(["run", write(tmp_path, "linefit", {"steps": 5})]) == 0
    assert capsys.readouterr().out.startswith("e: slope ")


@pytest.mark.parametrize(
    ("points", "kind", "expected"),
    [
        (
            [("dup", "a.b:C"), ("dup", "x.y:Z")],
            "dup",
            "kind: 'dup' is defined twice, by a.b:C and x.y:Z; uninstall one of the packages that define it",
        ),
        (
            [("broken", "example_kind.no_such_module:CAPABILITY")],
            "broken",
            "kind: capability 'broken' cannot be loaded (entry point broken = example_kind.no_such_module:CAPABILITY): "
            "ModuleNotFoundError: No module named 'example_kind.no_such_module'",
        ),
        (
            [("notcap", "example_kind.config:LOSS")],
            "notcap",
            "kind: entry point notcap = example_kind.config:LOSS names a Command, not a metaopt Capability",
        ),
        (
            [("other", "example_kind.config:CAPABILITY")],
            "other",
            "kind: entry point other = example_kind.config:CAPABILITY names the capability of kind 'linefit', "
            "not 'other'",
        ),
    ],
)
def test_a_bad_entry_point_is_one_error_line(entry_points, tmp_path, capsys, points, kind, expected):
    entry_points(*points)
    assert cli.main(["run", write(tmp_path, kind)]) == 2
    assert error_line(capsys) == f"metaopt: error: {expected}"


def test_the_same_entry_point_seen_twice_is_one_kind(entry_points):
    entry_points(("linefit", "example_kind.config:CAPABILITY"), ("linefit", "example_kind.config:CAPABILITY"))
    assert registry.kinds() == ["linefit"] and registry.get("linefit") is LINEFIT


def test_with_no_capability_installed_the_error_says_so(entry_points, tmp_path):
    entry_points()
    with pytest.raises(ConfigError, match="kind: unknown kind 'pbt'; allowed: none; no capability is installed"):
        config.from_dict({"name": "e", "kind": "pbt"})


def test_a_broken_plugin_leaves_the_other_verbs_working(entry_points, tmp_path, capsys):
    entry_points(("linefit", "example_kind.config:CAPABILITY"), ("broken", "example_kind.no_such_module:CAPABILITY"))
    assert cli.main(["run", write(tmp_path, "linefit", {"steps": 5})]) == 0  # the working kind runs
    assert capsys.readouterr().out.startswith("e: slope ")
    failures: list = []
    assert [command.name for command in cli.capability_commands(failures)] == ["linefit-loss"]
    assert len(failures) == 1
    with pytest.raises(SystemExit) as usage:  # possibly the broken plugin's verb, or a typo: both are said
        cli.main(["no-such-verb"])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and "warning: kind: capability 'broken' cannot be loaded" in err
    assert "invalid choice: 'no-such-verb'" in err
