"""The package's import layers, read from the source with `ast` (nothing is imported): every
import statement counts, at module level and inside functions, since a function-level import
hides a cycle rather than removing it.

- The backends form no cycle: backends.py (the contract) imports neither fast.py nor
  triton_backend.py; engines.py (the factory) imports all three and none imports it.
- kernels/ are leaves: they import nothing of ifad_fast.
- The package's cycles are exactly the known ones (KNOWN_CYCLES): a new one fails here, and so
  does a known one that is gone (then drop it from the list).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ifad_fast"
KERNELS = ROOT / "kernels"

# Strongly connected components of the import graph still present, each a frozenset of module
# names: none (restore hands 2D models to slices, and both use search and scoring).
KNOWN_CYCLES: set = set()
BACKEND_LAYER = {"backends", "fast", "triton_backend", "engines"}


def imported_names(path: Path, package: str = "ifad_fast") -> set[str]:
    """The top-level modules of `package` that the file imports anywhere in it (module level or
    inside functions): `from .x import y`, `from . import x`, `from ifad_fast.x import y`,
    `import ifad_fast.x`, and `from .x.y import z` as x."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names.update([node.module.split(".")[0]] if node.module else (a.name for a in node.names))
            elif node.level == 0 and node.module and node.module.split(".")[0] == package:
                parts = node.module.split(".")
                names.update([parts[1]] if len(parts) > 1 else (a.name for a in node.names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package and len(parts) > 1:
                    names.add(parts[1])
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (ifad_fast/*.py; kernels and data are not modules
    of the graph)."""
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {m: {n for n in imported_names(p) if n in modules and n != m} for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), set()

    def visit(v):
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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(found) -> str:
    return "; ".join(" <-> ".join(sorted(c)) for c in sorted(found, key=sorted)) or "none"


def test_the_graph_sees_function_level_imports():
    # cli imports most of the package inside its command functions only
    graph = import_graph()
    assert {"api", "train", "engines"} <= graph["cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_backends_and_their_factory_form_no_cycle():
    graph = import_graph()
    assert not graph["backends"] & {"fast", "triton_backend", "engines"}, graph["backends"]
    assert {"backends", "fast", "triton_backend"} <= graph["engines"]
    importers_of_engines = {m for m in BACKEND_LAYER if "engines" in graph[m]}
    assert not importers_of_engines, importers_of_engines
    sub = {m: graph[m] & BACKEND_LAYER for m in BACKEND_LAYER}
    assert not cycles(sub), describe(cycles(sub))
    assert not any(c & BACKEND_LAYER for c in cycles(graph)), describe(cycles(graph))


def test_kernels_import_nothing_of_ifad_fast():
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}:{node.lineno} imports above kernels/"
                assert not (node.module or "").startswith("ifad_fast"), f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.split(".")[0] == "ifad_fast"]
                assert not bad, f"{path.name}:{node.lineno} imports {bad}"


def test_the_package_has_only_the_known_import_cycles():
    found = cycles(import_graph())
    assert found == KNOWN_CYCLES, (f"import cycles now: {describe(found)}; new: {describe(found - KNOWN_CYCLES)}; "
                                   f"gone (drop from KNOWN_CYCLES): {describe(KNOWN_CYCLES - found)}")
