"""No import cycle among expandctl's modules, counting the imports inside functions (a lazy import that
dodges a cycle still makes one) and the package ``__init__`` that importing a submodule runs first."""

from __future__ import annotations

import ast
from pathlib import Path

import expandctl

PACKAGE = Path(expandctl.__file__).parent


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: the expandctl modules it imports}`` for every module under ``package``."""
    files = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}  # fmt: skip
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                base = ".".join([*parts, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for k in range(1, len(parts) + 1):  # the target and the packages above it, run first
                    name = ".".join(parts[:k])
                    if name in files and name != mod and not mod.startswith(name + "."):
                        graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_relative_absolute_and_in_function_imports():
    graph = import_graph(PACKAGE)
    assert "expandctl.layers.base" in graph["expandctl.layers.tree"]  # from .base import ...
    assert "expandctl.algebra" in graph["expandctl.layers.base"]  # from .. import algebra
    assert "expandctl.layers" in graph["expandctl.checkpoint.rebuild"]  # the package init runs first
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []
