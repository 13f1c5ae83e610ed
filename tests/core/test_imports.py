"""Code shaped like its data path: every module imports, no import cycles, doors hold.

The import graph is read from the source with ``ast``: every ``import`` and ``from ...
import`` of a module, at the top or inside a function (a lazy import still ties the
modules together), except those under ``if TYPE_CHECKING:`` (annotations only).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "music_interpret"
TEMPLATE = REPO / "plugins" / "music-interpret-notestats"
#: the plugin packages under plugins/: {top-level module: distribution folder}
PLUGIN_PACKAGES = {"mi_notestats": TEMPLATE, "mi_hf_remi": REPO / "plugins" / "music-interpret-hf-remi"}
#: running these modules starts a command (``python -m music_interpret``)
NOT_IMPORTED = {"music_interpret.__main__"}


def _modules(root: Path, base: Path) -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package)} of every module under ``root``."""
    out = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(base).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        out[".".join(parts)] = (file, package)
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, file: Path, package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports (outside TYPE_CHECKING)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node)
               for stmt in node.body for n in ast.walk(stmt)}
    here = name.split(".") if package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join([*here[: len(here) - node.level + 1], *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports} over music_interpret and the template."""
    modules = _modules(PACKAGE, REPO)
    for name, folder in PLUGIN_PACKAGES.items():
        modules.update(_modules(folder / name, folder))
    known = set(modules)
    return {name: _imports(name, file, package, known) for name, (file, package) in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), or a module
    importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("name", sorted(set(_modules(PACKAGE, REPO)) - NOT_IMPORTED))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_generic_code_goes_through_the_doors() -> None:
    """Only the MMT adapter imports the MMT adapter, and only the store package imports the
    store's modules (everyone else opens stores with ``music_interpret.stores.open_store`` and
    reads them through the typed reader of ``music_interpret.stores.reader``)."""
    bypass = []
    for module, imported in import_graph().items():
        for target in imported:
            adapter = target.startswith("music_interpret.adapters.") and \
                not module.startswith("music_interpret.adapters.")
            store = target.startswith("music_interpret.stores.") and \
                target != "music_interpret.stores.reader" and \
                not module.startswith("music_interpret.stores")
            if adapter or store:
                bypass.append(f"{module} imports {target}")
    assert not bypass, bypass


@pytest.mark.parametrize("package", sorted(PLUGIN_PACKAGES))
def test_plugin_packages_import_only_the_facade(package: str) -> None:
    imported = {t for m, ts in import_graph().items() if m.startswith(package) for t in ts
                if t.startswith("music_interpret")}
    assert imported == {"music_interpret.plugin"}
