"""The packages stay in their layers. Every static import (at module level or
inside a function) of every .py under the packages is read with `ast` and
mapped to the package it names:

    rank 0  icbdcore                 the base: imports no other icbd package
    rank 1  replicator cache icbdfs  siblings: none imports another
    rank 2  icbd                     the command line
    rank 3  harness                  real nodes for tests and benchmarks
    rank 4  bench                    the benchmark suite

A package imports only packages of a lower rank. `icbd bench` names
bench.suite:main by a string (icbd/cli.py) and imports it only when it runs:
the one upward edge, not a static import, so not seen here. And the graph of
module-level imports between packages has no cycle. As any user.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RANKS = {"icbdcore": 0, "replicator": 1, "cache": 1, "icbdfs": 1, "icbd": 2, "harness": 3, "bench": 4}


@dataclass(frozen=True)
class Edge:
    source: str  # the importing package
    target: str  # the imported package
    module: str  # the imported module, as written (absolute)
    file: str  # relative to the root walked
    line: int
    module_level: bool  # False: inside a function (imported when it runs)

    def __str__(self) -> str:
        where = "" if self.module_level else " (in a function)"
        return f"{self.file}:{self.line}: {self.source} -> {self.target} (import {self.module}){where}"


def _module_name(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(node: ast.Import | ast.ImportFrom, path: Path, root: Path) -> list[str]:
    """The absolute module names an import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module or ""]
    # Relative: from the package holding this module (the module itself for __init__.py).
    package = _module_name(path, root)
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    if node.level - 1 > len(package):
        return []  # beyond the top: not importable anyway
    if node.module:
        return [".".join([*base, node.module])]
    return [".".join([*base, alias.name]) for alias in node.names]


class _Imports(ast.NodeVisitor):
    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self._depth = 0  # functions entered

    def _function(self, node) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self._depth == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, self._depth == 0))


def import_edges(root: Path, packages=RANKS) -> list[Edge]:
    """Every import, under `root`, from one of `packages` to another."""
    edges = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            visitor = _Imports()
            visitor.visit(ast.parse(path.read_bytes(), filename=str(path)))
            for node, module_level in visitor.found:
                for module in _imported(node, path, root):
                    target = module.split(".")[0]
                    if target in packages and target != package:
                        edges.append(Edge(package, target, module, str(path.relative_to(root)),
                                          node.lineno, module_level))
    return edges


def layer_violations(edges: list[Edge], ranks=RANKS) -> list[str]:
    """Edges to a package of the same or a higher rank."""
    out = []
    for edge in edges:
        if ranks[edge.target] >= ranks[edge.source]:
            kind = "a sibling" if ranks[edge.target] == ranks[edge.source] else "a higher layer"
            out.append(f"{edge}: {edge.source} (rank {ranks[edge.source]}) imports {kind}, "
                       f"{edge.target} (rank {ranks[edge.target]})")
    return out


def import_cycles(edges: list[Edge]) -> list[str]:
    """Cycles in the graph of module-level imports between packages, each as
    its packages and one import per edge."""
    graph: dict[str, dict[str, Edge]] = defaultdict(dict)
    for edge in edges:
        if edge.module_level:
            graph[edge.source].setdefault(edge.target, edge)
    cycles, seen = [], set()

    def walk(package: str, path: list[str]) -> None:
        for target in sorted(graph[package]):
            if target in path:
                cycle = path[path.index(target):] + [target]
                key = frozenset(zip(cycle, cycle[1:], strict=False))
                if key not in seen:
                    seen.add(key)
                    steps = "; ".join(str(graph[a][b]) for a, b in zip(cycle, cycle[1:], strict=False))
                    cycles.append(f"{' -> '.join(cycle)}: {steps}")
            else:
                walk(target, [*path, target])

    for package in sorted(graph):
        walk(package, [package])
    return cycles


# --- the checker itself, on small made-up trees -------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in RANKS:
        (root / package).mkdir(exist_ok=True)
    return root


def test_a_clean_tree_passes(tmp_path):
    root = _tree(tmp_path, {
        "icbdcore/__init__.py": "import os\nfrom collections import abc\n",
        "icbdcore/wire.py": "from . import records\nfrom .records import x\n",
        "replicator/master.py": "from icbdcore import http\nfrom .streams import Spool\nimport trio\n",
        "cache/site.py": "import icbdcore.wire\n",
        "icbd/cli.py": "from replicator import master\nTARGET = 'bench.suite:main'\n"
                       "def f():\n    import importlib\n    return importlib.import_module('bench.suite')\n",
        "harness/cluster.py": "from icbd import cli\nfrom cache import site\n",
        "bench/suite.py": "from harness.cluster import Cluster\nfrom icbdcore import wire\n",
        "bench/images/desktop.py": "from .. import suite\nfrom ..suite import main\n",
    })
    edges = import_edges(root)
    assert layer_violations(edges) == [] and import_cycles(edges) == []
    assert {(e.source, e.target) for e in edges} == {
        ("replicator", "icbdcore"), ("cache", "icbdcore"), ("icbd", "replicator"),
        ("harness", "icbd"), ("harness", "cache"), ("bench", "harness"), ("bench", "icbdcore")}


def test_every_kind_of_violation_is_found_with_its_file_and_line(tmp_path):
    root = _tree(tmp_path, {
        "icbdcore/wire.py": "import os\n\nfrom replicator.btrfs import send\n",  # (a) base imports up
        "replicator/master.py": "def later():\n    from cache import site\n",  # (b) sibling, in a function
        "cache/site.py": "import icbd.cli as cli\n",  # (b) above
        "icbdfs/fs.py": "async def f():\n    import harness\n",  # (b) above, in an async function
        "icbd/cli.py": "from bench import suite\n",  # (c)
        "harness/cluster.py": "from bench.suite import main\n",  # harness below bench
        "bench/suite.py": "from .images import desktop\n",  # inside bench: fine
    })
    found = layer_violations(import_edges(root))
    expected = [
        "icbdcore/wire.py:3: icbdcore -> replicator", "replicator/master.py:2: replicator -> cache",
        "cache/site.py:1: cache -> icbd", "icbdfs/fs.py:2: icbdfs -> harness", "icbd/cli.py:1: icbd -> bench",
        "harness/cluster.py:1: harness -> bench",
    ]
    assert len(found) == len(expected), found
    for message, start in zip(sorted(found), sorted(expected), strict=True):
        assert message.startswith(start), (message, start)
    assert any("in a function" in m and "replicator/master.py" in m for m in found)
    assert any("a sibling, cache (rank 1)" in m for m in found)


def test_relative_imports_are_resolved(tmp_path):
    root = _tree(tmp_path, {
        "cache/sub/deep.py": "from ... import icbdfs\nfrom ...icbdfs import fs\nfrom .. import site\n",
        "cache/sub/__init__.py": "from .. import blockstore\nfrom . import deep\n",
    })
    edges = import_edges(root)
    assert sorted((e.file, e.line, e.target) for e in edges) == [
        ("cache/sub/deep.py", 1, "icbdfs"), ("cache/sub/deep.py", 2, "icbdfs")]


def test_a_cycle_of_module_level_imports_is_found(tmp_path):
    root = _tree(tmp_path, {
        "replicator/a.py": "from cache import b\n",
        "cache/b.py": "import replicator.a\n",
        "icbd/c.py": "def f():\n    import harness\n",  # inside a function: no cycle edge
        "harness/d.py": "import icbd.c\n",
    })
    edges = import_edges(root)
    cycles = import_cycles(edges)
    assert len(cycles) == 1, cycles
    assert cycles[0].startswith("cache -> replicator -> cache: cache/b.py:1: cache -> replicator")
    assert "replicator/a.py:1: replicator -> cache" in cycles[0]


# --- this checkout ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    for package in RANKS:
        assert (REPO / package / "__init__.py").is_file(), f"no package {package} in {REPO}"
    return import_edges(REPO)


def test_packages_import_only_lower_layers(edges):
    violations = layer_violations(edges)
    assert not violations, "imports across the layers:\n" + "\n".join(violations)


def test_no_import_cycle_between_packages(edges):
    cycles = import_cycles(edges)
    assert not cycles, "import cycles between packages:\n" + "\n".join(cycles)


def test_the_layers_are_really_used(edges):
    """A check of the check: the walk sees the imports it should (so an empty
    walk cannot pass the two tests above)."""
    pairs = {(e.source, e.target) for e in edges}
    assert {("replicator", "icbdcore"), ("cache", "icbdcore"), ("icbdfs", "icbdcore"),
            ("bench", "harness")} <= pairs, pairs
