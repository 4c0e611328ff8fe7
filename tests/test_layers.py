"""The package's layers depend one way, and no modules import each other in a cycle.

Layers, lowest first (README, "Code layout"): ``core`` (pure logic), ``storage``
(catalogue, arrays, locks, read path), ``ops`` (operations on an open store), ``api``
(the public facade, with ``tdstore/__init__``), ``analysis``, ``integrations``, ``dev``
(benchmark, harnesses, demo), then the command line. A module may import its own layer
and the layers below it, never one above: imports read from the source (module level,
inside functions and under ``TYPE_CHECKING`` alike).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tdstore"
LAYERS = ["core", "storage", "ops", "api", "analysis", "integrations", "dev", "cli"]
# modules that are a layer by themselves, by their path under tdstore/
TOP = {"__init__": "api", "cli": "cli", "entry": "cli", "interrupt": "cli", "__main__": "cli"}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, bool]]:
    """(imported module, whether it runs at import time or call time) for every import
    of a package module in ``path``; ``TYPE_CHECKING`` imports are marked not run."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for sub in ast.walk(child):
                    type_only.add(id(sub))
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import name``: the submodule pkg.name if there is one, else pkg
            targets = [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t == root.name or t.startswith(root.name + "."):
                found.append((t, id(node) not in type_only))
    return found


def graph(root: Path) -> dict[str, set[tuple[str, bool]]]:
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    edges: dict[str, set[tuple[str, bool]]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, runs in imports_of(path, root):
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != mod:
                edges[mod].add((target, runs))
    return edges


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS.index(TOP.get(key, key))


def upward_imports(root: Path) -> list[str]:
    bad = []
    for mod, targets in graph(root).items():
        for target, _ in targets:
            if layer_of(target) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)]}) imports {target} "
                           f"({LAYERS[layer_of(target)]})")
    return sorted(bad)


def cycles(root: Path) -> list[list[str]]:
    """Cycles of imports that run (module level or inside functions; ``TYPE_CHECKING``
    imports never run). ``from tdstore import x`` is an edge to ``tdstore/__init__``."""
    edges = {m: {t for t, runs in ts if runs} for m, ts in graph(root).items()}
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_every_module_belongs_to_a_layer():
    for mod in graph(PACKAGE):
        layer_of(mod)  # raises ValueError for a module outside the layers


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(PACKAGE) == []


def test_no_import_cycles():
    assert cycles(PACKAGE) == []


@pytest.mark.parametrize("source, problem", [
    ("from tdstore.api.store import Store\n", "upward"),
    ("def f():\n    from tdstore.cli import main\n", "upward"),
])
def test_the_check_catches_an_upward_import(tmp_path, source, problem):
    """A copy of the package with one upward import added to a storage module fails."""
    import shutil

    copy = tmp_path / "tdstore"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "storage" / "locks.py"
    target.write_text(target.read_text() + "\n" + source)
    assert any(line.startswith("tdstore.storage.locks (storage) imports")
               for line in upward_imports(copy))


def test_the_check_catches_a_cycle(tmp_path):
    """Two modules of one layer importing each other at module level are a cycle."""
    import shutil

    copy = tmp_path / "tdstore"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    diff = copy / "core" / "diff.py"
    diff.write_text(diff.read_text() + "\nfrom tdstore.core import validate\n")
    assert any("tdstore.core.diff" in c and "tdstore.core.validate" in c
               for c in cycles(copy))
