"""Optional dependencies: a missing extra is one error line naming it, and pyproject.toml declares what we import.

Pure checks (no Ray): ``metaopt.extras`` against a faked-missing module, and the import statements of the
project's own code against the distributions pyproject.toml declares.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from metaopt import extras
from metaopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("platform", "tests", "benchmarks")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def hide_module(monkeypatch, missing: str) -> None:
    """Make ``find_spec`` report ``missing`` as not installed, leaving every other lookup alone."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == missing else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.delitem(sys.modules, missing, raising=False)


def test_require_passes_when_the_extra_is_installed():
    for extra in extras.EXTRAS:  # the development install has every extra
        extras.require(extra, "some.field")


def test_missing_module_is_one_line_naming_the_field_the_extra_and_the_pip_command(monkeypatch):
    hide_module(monkeypatch, "GPy")
    with pytest.raises(ConfigError) as caught:
        extras.require("pb2", "pbt.scheduler")
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        "pbt.scheduler: needs the optional dependencies of metaopt-platform[pb2] (GPy is not installed): "
        "pip install 'metaopt-platform[pb2]'"
    )
    assert caught.value.field == "pbt.scheduler"


def test_the_first_missing_module_of_an_extra_is_named(monkeypatch):
    hide_module(monkeypatch, "tokenizers")
    assert extras.missing_module("posttrain") == "tokenizers"
    assert extras.missing_module("pb2") is None  # other extras are unaffected
    with pytest.raises(ConfigError, match=r"^posttrain\.model: .*\(tokenizers is not installed\)"):
        extras.require("posttrain", "posttrain.model")


def test_the_check_imports_nothing(monkeypatch):
    monkeypatch.delitem(sys.modules, "GPy", raising=False)
    extras.require("pb2", "pbt.scheduler")
    assert "GPy" not in sys.modules


def test_an_unknown_extra_is_a_programming_error_not_a_passing_check():
    with pytest.raises(ValueError, match="unknown extra 'pb3'"):
        extras.require("pb3", "pbt.scheduler")
    with pytest.raises(ValueError, match="unknown extra 'pb3'"):
        extras.require("pb3", "pbt.scheduler", {"check_paths": False})  # also where nothing is required


def test_an_extra_is_required_only_where_the_experiment_runs(monkeypatch):
    """``metaopt run`` validates with check_paths true (or code with no context): the extra must be here.
    ``metaopt submit`` / ``list`` validate with check_paths false: the cluster has its own packages."""
    hide_module(monkeypatch, "GPy")
    for runs_here in (None, {"check_paths": True}, {}):
        with pytest.raises(ConfigError, match=r"^pbt\.scheduler: needs .*\(GPy is not installed\)"):
            extras.require("pb2", "pbt.scheduler", runs_here)
    extras.require("pb2", "pbt.scheduler", {"check_paths": False})


def test_the_rllib_extra_covers_the_gymnasium_its_env_check_imports(monkeypatch):
    hide_module(monkeypatch, "gymnasium")
    assert extras.missing_module("rllib") == "gymnasium"


# ---- pyproject.toml agrees with the code ---------------------------------------------------------------------


def declared_requirements() -> dict[str, list[Requirement]]:
    """``""`` -> core dependencies, then one entry per extra, as parsed requirements."""
    project = PYPROJECT["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(line) for line in lines] for group, lines in groups.items()}


def distributions_brought_by(requirement: Requirement) -> set[str]:
    """The distribution a requirement names plus those its requested extras add (``ray[rllib]`` adds dm-tree)."""
    brought: set[str] = {canonicalize_name(requirement.name)}
    try:
        dependencies = requires(requirement.name) or []
    except PackageNotFoundError:  # e.g. jax[cuda12]'s plugins, absent from a CPU install
        return brought
    for line in dependencies:
        dependency = Requirement(line)
        marker = dependency.marker
        if marker is None or "extra" not in str(marker):
            continue
        if any(marker.evaluate({"extra": extra}) for extra in requirement.extras):
            brought.add(canonicalize_name(dependency.name))
    return brought


def test_every_extra_of_the_code_is_a_pip_extra_whose_packages_provide_its_modules():
    groups = declared_requirements()
    module_owners = packages_distributions()
    for extra, modules in extras.EXTRAS.items():
        assert extra in groups, f"extra {extra!r} missing from [project.optional-dependencies]"
        brought = set().union(*(distributions_brought_by(r) for r in groups[extra]))
        for module in modules:
            owners = {canonicalize_name(name) for name in module_owners.get(module, [])}
            assert owners & brought, f"{module} ({owners}) is not brought by metaopt-platform[{extra}]"


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files importing it, over every absolute import in the project's Python files."""
    # The project's own top-level names: modules and packages at the top of each root (tests/example_kind, ...).
    tops = [path for root in SOURCE_ROOTS for path in (REPO / root).iterdir()]
    local = {"metaopt"} | {path.stem for path in tops if path.suffix == ".py" or path.is_dir()}
    found: dict[str, set[str]] = {}
    for root in SOURCE_ROOTS:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names} - local - set(sys.stdlib_module_names):
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_module_the_code_imports_is_declared_by_name():
    """Relying on a package that only arrives as someone else's dependency breaks when they drop it."""
    declared = {canonicalize_name(r.name) for group in declared_requirements().values() for r in group}
    module_owners = packages_distributions()
    undeclared = {}
    for module, files in third_party_imports().items():
        owners = {canonicalize_name(name) for name in module_owners.get(module, [module])}
        if not owners & declared:
            undeclared[module] = sorted(files)[:3]
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_pins_are_bounded_where_the_code_relies_on_internals():
    """Ray is pinned to its minor (the Jobs API and token auth need matching versions); the libraries whose
    private or fast-moving APIs we use carry compatible-release bounds."""
    lines = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]
    by_name: dict[str, Requirement] = {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines}
    assert re.fullmatch(r"==2\.60\.\*", str(by_name["ray"].specifier))
    for name in ("mlflow", "jax", "jaxlib", "optax", "evosax", "gymnax", "pydantic", "pytorch-optimizer", "trl"):
        assert "~=" in str(by_name[name].specifier), name
