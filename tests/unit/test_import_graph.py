"""The import graph of serve_app, actors and deployments: no cycles, and layers kept.

Every ``import`` counts, those inside functions too (an import hidden in a function is
still a dependency; hiding one only moves a cycle from import time to run time).
``deployments/`` and ``actors/`` may import only the shared leaves and each other, never
the gateway, routes, CLI, builder, HTTP plumbing or policies.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serve_app", "actors", "deployments")

#: What deployments/ and actors/ may import from serve_app (a module or a package's tree).
SHARED_LEAVES = (
    "serve_app.errors",
    "serve_app.protocol",
    "serve_app.settings",
    "serve_app.store",
    "serve_app.pricing",
    "serve_app.tracing",
)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module an ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, current: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``source`` imports, anywhere in the file."""
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # a name inside a module: its module
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, current, is_package)
            for alias in node.names:  # ``from pkg import module`` imports the module
                full = f"{target}.{alias.name}"
                add(full if full in known else target)
    found.discard(current)
    return found


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    known = set(files)
    return {
        name: imports_of(path.read_text(), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle as a path ``[a, b, ..., a]``, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports from deployments/ or actors/ into serve_app outside the shared leaves."""
    bad = []
    for name, targets in sorted(graph.items()):
        if name.split(".")[0] not in ("deployments", "actors"):
            continue
        for target in sorted(targets):
            if target.split(".")[0] != "serve_app":
                continue
            if not any(target == leaf or target.startswith(leaf + ".") for leaf in SHARED_LEAVES):
                bad.append(f"{name} -> {target}")
    return bad


# ------------------------------------------------------------------ the real graph


def test_the_graph_sees_every_package_and_nested_imports() -> None:
    graph = import_graph()
    assert {"serve_app.gateway.core", "actors.session", "deployments.llm"} <= set(graph)
    # an import inside a function body counts (build/actors.py imports actors.metrics there)
    assert "actors.metrics" in graph["serve_app.build.actors"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_deployments_and_actors_import_only_shared_leaves() -> None:
    assert layer_violations(import_graph()) == []


# ------------------------------------------------------------- the checker itself


def test_a_synthetic_cycle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from pkg.two import helper\n")
    (pkg / "two.py").write_text(
        "def helper():\n    from pkg import one  # hidden in a function\n    return one\n"
    )
    (pkg / "three.py").write_text("from . import one\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.three"] == {"pkg.one"}  # relative import resolved
    assert find_cycle(graph) == ["pkg.one", "pkg.two", "pkg.one"]


def test_a_layer_violation_is_found() -> None:
    graph = {
        "deployments.llm": {"serve_app.settings.modality", "serve_app.errors"},
        "actors.session": {"serve_app.build.app", "actors.names"},
        "serve_app.build.app": {"actors.session"},
    }
    assert layer_violations(graph) == ["actors.session -> serve_app.build.app"]
