"""The import graph of ``platform/metaopt`` keeps the layers of docs/architecture.md.

Layers, lowest first: core, shared learning pieces, edges, capabilities, cli. An import points down or sideways
within its layer, never up; capabilities never import each other; and no import cycle runs between folders or
between modules. Every ``import`` statement counts wherever it stands (module level, inside a function, under
``if TYPE_CHECKING``): a function-level import is still a dependency, only a later one.

The graph is read with :mod:`ast` from the source, nothing is imported. Each failure lists the offending imports
as ``file:line``. The checker is itself tested on small planted trees, so it cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

from metaopt import registry

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "metaopt"
PACKAGE_DIR = REPO / "platform" / PACKAGE

# Top-level modules and folders of metaopt per layer; capabilities are the folders metaopt.registry.BUILT_IN
# names (see capability_folders). "metaopt" is the package's own __init__.
LAYERS: dict[str, frozenset[str]] = {
    "core": frozenset(
        {
            "metaopt",
            "errors",
            "redact",
            "cache",
            "progress",
            "stopping",
            "extras",
            "config",
            "registry",
            "compat",
            "user_code",
            "stats",
        }
    ),
    "shared": frozenset({"optim", "tasks"}),
    "edges": frozenset(
        {
            "runtime",
            "tracking",
            "jobs",
            "session",
            "tuning",
            "even_finish",
            "even_finish_pb2",
            "trainable",
            "report",
            "worker_start",
        }
    ),
    "capabilities": frozenset(),  # filled from the built-in capability table
    "cli": frozenset({"cli", "api"}),
}


@dataclass(frozen=True)
class Import:
    """``source`` imports ``target`` (both modules of the package) at ``path``:``line``."""

    source: str
    target: str
    path: Path
    line: int

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


# --------------------------------------------------------------------------------------------- reading the graph


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the package (a package is its ``__init__``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of the package that importing ``name`` runs: the longest dotted prefix that is a module
    (``metaopt.optim.schedules.Schedule`` -> ``metaopt.optim.schedules``); None outside the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a package module in ``path``: ``import a.b``, ``from a import b`` (b a module or a name),
    relative imports, at any depth of the syntax tree."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # ``from a import b``: the module a.b when there is one, else the name b of module a
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(name, modules)
            if target is not None and target != module:
                found.append(Import(module, target, path, node.lineno))
    return found


def import_graph(package_dir: Path) -> list[Import]:
    modules = module_files(package_dir)
    return sorted(
        (edge for module, path in modules.items() for edge in imports_of(module, path, modules)),
        key=lambda edge: (str(edge.path), edge.line, edge.target),
    )


def capability_folders(built_in: dict[str, str]) -> frozenset[str]:
    """The folders whose modules the built-in capability table names (kind -> "module:attribute"): the
    capability layer."""
    return frozenset(target.split(":")[0].split(".")[1] for target in built_in.values())


def unit_of(module: str) -> str:
    """The folder (or top-level module) a module belongs to: ``metaopt.pbt.sweep`` -> ``pbt``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(module: str, layers: dict[str, frozenset[str]]) -> str | None:
    unit = unit_of(module)
    return next((layer for layer, units in layers.items() if unit in units), None)


# ----------------------------------------------------------------------------------------------- the four checks


def unassigned_modules(modules: list[str], layers: dict[str, frozenset[str]]) -> list[str]:
    return sorted({unit_of(module) for module in modules if layer_of(module, layers) is None})


def upward_imports(edges: list[Import], layers: dict[str, frozenset[str]], root: Path) -> list[str]:
    """(a) An import from a lower layer to a higher one."""
    rank = {layer: position for position, layer in enumerate(layers)}
    problems = []
    for edge in edges:
        low, high = layer_of(edge.source, layers), layer_of(edge.target, layers)
        if low is not None and high is not None and rank[high] > rank[low]:
            problems.append(f"{edge.where(root)}: {edge.source} ({low}) imports {edge.target} ({high})")
    return problems


def imports_between_capabilities(edges: list[Import], layers: dict[str, frozenset[str]], root: Path) -> list[str]:
    """(b) A capability importing another capability."""
    capabilities = layers["capabilities"]
    return [
        f"{edge.where(root)}: {edge.source} imports {edge.target}"
        for edge in edges
        if unit_of(edge.source) in capabilities
        and unit_of(edge.target) in capabilities
        and unit_of(edge.source) != unit_of(edge.target)
    ]


def cycles(edges: list[Import], node_of, root: Path, what: str) -> list[str]:
    """(c, d) One readable entry per strongly connected group of ``node_of(module)`` nodes: a cycle through it,
    each step with the imports that make it. Breaking that cycle may leave another in the group; the next run
    names it."""
    graph = nx.DiGraph()
    for edge in edges:
        source, target = node_of(edge.source), node_of(edge.target)
        if source != target:
            graph.add_edge(source, target)
            graph.edges[source, target].setdefault("imports", []).append(edge)
    problems = []
    for group in sorted(map(sorted, nx.strongly_connected_components(graph))):
        if len(group) < 2:
            continue
        cycle = nx.find_cycle(graph.subgraph(group), source=group[0])
        path = " -> ".join([*(source for source, _ in cycle), cycle[0][0]])
        steps = [
            f"    {source} -> {target}: "
            + ", ".join(edge.where(root) for edge in graph.edges[source, target]["imports"])
            for source, target in cycle
        ]
        others = sorted(set(group) - {source for source, _ in cycle})
        also = [f"    (the same tangle also holds {', '.join(others)})"] if others else []
        problems.append("\n".join([f"import cycle between {what}: {path}", *steps, *also]))
    return problems


def folder_cycles(edges: list[Import], root: Path) -> list[str]:
    return cycles(edges, unit_of, root, "folders")


def module_cycles(edges: list[Import], root: Path) -> list[str]:
    return cycles(edges, lambda module: module, root, "modules")


def report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------------ metaopt itself


@pytest.fixture(scope="module")
def layers() -> dict[str, frozenset[str]]:
    return {**LAYERS, "capabilities": capability_folders(registry.BUILT_IN)}


@pytest.fixture(scope="module")
def edges() -> list[Import]:
    return import_graph(PACKAGE_DIR)


def test_the_capability_folders_are_the_built_in_kinds(layers):
    assert {"pbt", "federated", "objectives", "symbolic", "posttrain"} <= layers["capabilities"]
    assert all((PACKAGE_DIR / folder / "__init__.py").is_file() for folder in layers["capabilities"])


def test_every_module_has_a_layer(layers):
    unassigned = unassigned_modules(list(module_files(PACKAGE_DIR)), layers)
    assert not unassigned, (
        f"place these in a layer (LAYERS in {Path(__file__).name}, or register a capability "
        f"in metaopt.registry.BUILT_IN): {', '.join(unassigned)}"
    )


def test_no_import_points_up_a_layer(edges, layers):
    problems = upward_imports(edges, layers, REPO)
    assert not problems, report(problems, "imports point up a layer (core < shared < edges < capabilities < cli)")


def test_capabilities_never_import_each_other(edges, layers):
    problems = imports_between_capabilities(edges, layers, REPO)
    assert not problems, report(problems, "imports between capabilities")


def test_no_import_cycle_between_folders(edges):
    problems = folder_cycles(edges, REPO)
    assert not problems, report(problems, "import cycles between folders")


def test_no_import_cycle_between_modules(edges):
    problems = module_cycles(edges, REPO)
    assert not problems, report(problems, "import cycles between modules")


def test_the_graph_holds_the_imports_we_know_of(edges):
    """Guards against a reader that silently finds nothing: imports of every form metaopt uses are seen."""
    pairs = {(edge.source, edge.target) for edge in edges}
    assert ("metaopt.cli", "metaopt.registry") in pairs  # from metaopt import registry (module-level)
    assert ("metaopt.config", "metaopt.errors") in pairs  # from metaopt.errors import ConfigError
    assert ("metaopt.pbt.commands", "metaopt.pbt.replay") in pairs  # inside a function
    assert len(edges) > 100


# ------------------------------------------------------------------------------------- the checker on planted trees


PLANTED = {
    "__init__.py": "",
    "config.py": "import os\n\n\ndef later():\n    from metaopt.pbt import sweep\n",  # (a) upward, in a function
    "cli.py": "from metaopt.pbt import sweep\nimport metaopt.config\n",  # down: allowed
    "stray.py": "",  # in no layer
    "optim/__init__.py": "",
    "optim/a.py": "from ..tasks import b\n",  # sideways within shared: allowed, but ...
    "tasks/__init__.py": "",
    "tasks/b.py": "import metaopt.optim.a\n",  # ... (c) a folder cycle optim <-> tasks, (d) modules a <-> b
    "pbt/__init__.py": "",
    "pbt/sweep.py": "from metaopt.symbolic.search import run\nfrom . import lineage\n",  # (b) capability -> capability
    "pbt/lineage.py": "from metaopt.pbt.sweep import run\n",  # (d) sweep <-> lineage inside one folder
    "symbolic/__init__.py": "",
    "symbolic/search.py": "from metaopt import optim\nfrom metaopt.optim import a\n",  # down: allowed
}
PLANTED_LAYERS = {**LAYERS, "capabilities": frozenset({"pbt", "symbolic"})}


def plant(root: Path, files: dict[str, str]) -> Path:
    package_dir = root / PACKAGE
    for name, text in files.items():
        (package_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (package_dir / name).write_text(text)
    return package_dir


def test_the_checker_finds_each_planted_violation_with_its_line(tmp_path):
    edges = import_graph(plant(tmp_path, PLANTED))

    assert unassigned_modules(list(module_files(tmp_path / PACKAGE)), PLANTED_LAYERS) == ["stray"]
    assert upward_imports(edges, PLANTED_LAYERS, tmp_path) == [
        "metaopt/config.py:5: metaopt.config (core) imports metaopt.pbt.sweep (capabilities)"
    ]
    assert imports_between_capabilities(edges, PLANTED_LAYERS, tmp_path) == [
        "metaopt/pbt/sweep.py:1: metaopt.pbt.sweep imports metaopt.symbolic.search"
    ]
    assert folder_cycles(edges, tmp_path) == [
        "import cycle between folders: optim -> tasks -> optim\n"
        "    optim -> tasks: metaopt/optim/a.py:1\n"
        "    tasks -> optim: metaopt/tasks/b.py:1"
    ]
    found = module_cycles(edges, tmp_path)
    assert [problem.splitlines()[0] for problem in found] == [
        "import cycle between modules: metaopt.optim.a -> metaopt.tasks.b -> metaopt.optim.a",
        "import cycle between modules: metaopt.pbt.lineage -> metaopt.pbt.sweep -> metaopt.pbt.lineage",
    ]
    assert "    metaopt.pbt.sweep -> metaopt.pbt.lineage: metaopt/pbt/sweep.py:2" in found[1].splitlines()


def test_the_checker_passes_the_same_tree_without_the_violations(tmp_path):
    clean = {
        **PLANTED,
        "config.py": "import os\n",
        "tasks/b.py": "import os\n",
        "pbt/lineage.py": "",
        "pbt/sweep.py": "from . import lineage\nfrom metaopt.optim import a\n",
    }
    del clean["stray.py"]
    edges = import_graph(plant(tmp_path, clean))

    assert len(edges) == 7  # cli x2, optim.a, pbt.sweep x2, symbolic.search x2: every form was read
    assert {(edge.source, edge.target) for edge in edges if edge.source == "metaopt.symbolic.search"} == {
        ("metaopt.symbolic.search", "metaopt.optim"),
        ("metaopt.symbolic.search", "metaopt.optim.a"),
    }
    assert unassigned_modules(list(module_files(tmp_path / PACKAGE)), PLANTED_LAYERS) == []
    assert upward_imports(edges, PLANTED_LAYERS, tmp_path) == []
    assert imports_between_capabilities(edges, PLANTED_LAYERS, tmp_path) == []
    assert folder_cycles(edges, tmp_path) == [] and module_cycles(edges, tmp_path) == []


def test_relative_imports_resolve_from_a_package_and_from_a_module(tmp_path):
    files = {
        "__init__.py": "",
        "config.py": "",
        "pbt/__init__.py": "from . import sweep\nfrom .. import config\n",
        "pbt/sweep.py": "from .lineage import x\nfrom ..config import y\n",
        "pbt/lineage.py": "",
    }
    pairs = {(edge.source, edge.target) for edge in import_graph(plant(tmp_path, files))}
    assert pairs == {
        ("metaopt.pbt", "metaopt.pbt.sweep"),
        ("metaopt.pbt", "metaopt.config"),
        ("metaopt.pbt.sweep", "metaopt.pbt.lineage"),
        ("metaopt.pbt.sweep", "metaopt.config"),
    }
