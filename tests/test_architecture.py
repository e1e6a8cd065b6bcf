"""The package's layers (docs/architecture.md), read from the source: no module imports from a layer
above its own (imports at module top and inside functions alike), the module-level imports have no
cycle, and the CLI's entry points load no torch.

A module must be placed in :data:`LAYERS` (or inside a package placed there): a new top-level module
or package fails :func:`test_every_module_has_a_layer` until it is given one, here and in
docs/architecture.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "expandctl"

#: Layer of each top-level module or package of ``expandctl`` (bottom first), as in docs/architecture.md.
LAYERS = {
    "": 0,  # expandctl/__init__.py: a lazy facade (PEP 562), imports only _version and errors at its top
    "_version": 0,
    "errors": 0,
    "progress": 0,
    "console": 1,
    "kinds": 1,
    "data": 2,
    "algebra": 2,
    "layers": 2,
    "checkpoint": 2,
    "shapes": 2,
    "models": 2,
    "sizes": 2,
    "rewrite": 3,
    "fold": 3,
    "probe": 3,
    "graph": 3,
    "verify": 3,
    "export": 3,
    "quantize": 3,
    "evaluate": 3,
    "context": 3,
    "train": 4,
    "analysis": 4,
    "experiments": 4,
    "integrations": 4,
    "workflows": 5,
    "commands": 6,
    "cli": 6,
    "__main__": 6,
}
#: Modules inside a package whose layer differs from the package's: the torch-free part of ``data``
#: (what ``--data`` help and the data registry read).
SUBMODULE_LAYERS = {
    "data": 1,  # expandctl/data/__init__.py: torch-free names at its top, the rest lazily
    "data.registry": 1,
    "data.sources": 1,
    "data.options": 1,
    "data.raw": 1,
    "data.files": 1,
    "data.idx": 1,
}
#: Modules that must import no torch at module top (the CLI's --help path).
TORCH_FREE = [
    "cli",
    "commands",
    "console",
    "kinds",
    "data.registry",
    "data.sources",
    "_version",
    "errors",
    "progress",
    "",
]


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name relative to ``expandctl`` ("" for the package)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = modules()


def layer(name: str) -> int | None:
    """``name``'s layer: its own entry in SUBMODULE_LAYERS, that of the package holding it, or its
    top-level module's or package's in LAYERS (None: not placed)."""
    if name in SUBMODULE_LAYERS:
        return SUBMODULE_LAYERS[name]
    parts = name.split(".") if name else []
    for n in range(len(parts) - 1, 1, -1):
        if ".".join(parts[:n]) in SUBMODULE_LAYERS:
            return SUBMODULE_LAYERS[".".join(parts[:n])]
    return LAYERS.get(parts[0] if parts else "")


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def imports(name: str, top_only: bool) -> dict[str, int]:
    """The expandctl modules that module ``name`` imports (relative names -> line): at module top only
    (``top_only``; not under ``if TYPE_CHECKING``), or anywhere in the file. ``from X import y`` is an
    import of ``X.y`` where that is a module, else of ``X``."""
    tree = ast.parse(MODULES[name].read_text())
    parts = name.split(".") if name else []
    package = parts if _is_package(name) else parts[:-1]
    nodes = tree.body if top_only else list(ast.walk(tree))
    if top_only:  # module top: also the bodies of top-level try/if, except `if TYPE_CHECKING:`
        for node in list(nodes):
            if isinstance(node, ast.Try):
                nodes += node.body + [s for h in node.handlers for s in h.body]
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                nodes += node.body + node.orelse
    found: dict[str, int] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "expandctl" or alias.name.startswith("expandctl."):
                    found.setdefault(alias.name.removeprefix("expandctl").lstrip("."), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "expandctl" or node.module.startswith("expandctl.")):
                target = node.module.removeprefix("expandctl").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.setdefault(sub if sub in MODULES else target, node.lineno)
    return found


def test_every_module_has_a_layer():
    missing = sorted(f"expandctl.{n}" if n else "expandctl" for n in MODULES if layer(n) is None)
    assert not missing, f"place these in tests/test_architecture.py's LAYERS and docs/architecture.md: {missing}"


def test_no_module_imports_from_a_higher_layer():
    """Module top and function bodies alike: a lazy import is still a dependency."""
    bad = []
    for name in MODULES:
        own = layer(name)
        for target, line in imports(name, top_only=False).items():
            theirs = layer(target)
            if own is not None and theirs is not None and theirs > own:
                bad.append(
                    f"expandctl/{MODULES[name].relative_to(PACKAGE)}:{line} (layer {own}) imports "
                    f"expandctl.{target} (layer {theirs})"
                )
    assert not bad, "\n".join(bad)


def test_no_import_cycle_at_module_top():
    graph = {name: set(imports(name, top_only=True)) & MODULES.keys() for name in MODULES}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(f"expandctl.{n}" for n in [*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_cli_modules_import_no_torch_at_their_top():
    bad = []
    for name, path in MODULES.items():
        if not any(name == p or name.startswith(f"{p}.") or (p == "" and name == "") for p in TORCH_FREE):
            continue
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n and (n == "torch" or n.startswith(("torch.", "torchvision"))) for n in names):
                bad.append(f"expandctl/{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not bad, f"torch imported at module top where --help must not load it: {bad}"


HELP = """
import sys
from expandctl.cli import COMMANDS, main
assert "torch" not in sys.modules, "import expandctl.cli loaded torch"
for argv in [["--help"], *([c, "--help"] for c, _ in COMMANDS)]:
    sys.argv = ["expandctl", *argv]
    try:
        main()
    except SystemExit:
        pass
    assert "torch" not in sys.modules, f"expandctl {' '.join(argv)} loaded torch"
"""


@pytest.mark.parametrize(
    "code", ["import sys, expandctl.cli; assert 'torch' not in sys.modules", HELP], ids=["import-cli", "every-help"]
)
def test_the_cli_and_its_help_load_no_torch(code):
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_table_reads_imports_the_way_python_does():
    assert layer("data.sources.digits") == 1 and layer("data.pipeline") == 2 and layer("commands.train") == 6
    assert layer("") == 0 and layer("datasetz") is None
    assert "errors" in imports("", top_only=True)  # the package's own __init__: `from .errors import ...`
