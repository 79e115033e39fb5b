"""The package's import layers, read from the source with `ast` (nothing is imported but in the
last test, which checks the public re-exports).

A module is named by its dotted path inside ifad_fast: `api`, `backends.base`, `restore.search`;
a subpackage's __init__ is a module of its own (`backends`, `restore`, `benchmarks`), and so are
the kernels (`kernels`, `kernels.numba_ops`, ...: kernels/ is installed as ifad_fast.kernels).
The root ifad_fast/__init__.py is not: it holds __version__ and imports its public names by name
on first use (importlib), so `from . import __version__` pulls in nothing.

Every import statement counts, at module level and inside functions (a function-level import
hides a cycle rather than removing it): `from .x import y`, `from ..x import y`, `from . import x`,
`from ..pkg import x` (x the module when it is one, else the module it is taken from),
`from ifad_fast.x import y`, `import ifad_fast.x.y`. Importing a module of a subpackage from
outside it runs the subpackage's __init__ first, so that counts as an import of the __init__ too.

Asserted: (a) no import cycle; (b) kernels/ import nothing of ifad_fast; (c) no import up a layer
(LAYERS, bottom first, the drawing in docs/architecture.md): every import goes to the same layer
or a lower one, except the KNOWN_UPWARD ones (none today); (d) every `from .x import` names a
module of the package (after a move, a stale function-level import would fail only when run).
Every module sits in exactly one layer, so a new module has to be placed. The checker is run on a
toy package first, so none of this can pass because the graph came out empty.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ifad_fast"
KERNELS = ROOT / "kernels"

# Bottom first; a module may import from its own layer and the ones below (docs/architecture.md).
LAYERS = (
    ("kernels", {"kernels", "kernels.numba_ops", "kernels.torch_ops", "kernels.triton_decoder"}),
    ("base", {"config", "errors", "extras", "progress", "limits", "locks", "distributed", "sampling", "augment"}),
    ("data", {"model", "preprocess", "io", "metrics", "register"}),
    ("backends", {"backends", "backends.base", "backends.fast", "backends.triton", "backends.factory"}),
    ("engine", {"restore", "restore.volume", "restore.slices", "restore.core", "restore.search", "restore.scoring",
                "restore.local", "train"}),
    ("library", {"api", "api.results", "api.outputs", "api.files", "api.restorer", "api.evaluation", "api.jobs",
                 "api.calibration", "dataset", "baselines", "acquisition", "pairing", "layouts", "figures", "synth",
                 "reference"}),
    ("entry points", {"cli", "demo", "benchmarks", "benchmarks.accuracy", "benchmarks.speed",
                      "benchmarks.training", "benchmarks.machine"}),
)
# (importer, imported) -> why this import goes up a layer; none today.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def modules(package: Path = PACKAGE, kernels: Path | None = KERNELS) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__), for every module of the package and its
    kernels; the root __init__ is left out (see the module docstring)."""
    found = {}
    trees = [(package, ())] + ([(kernels, ("kernels",))] if kernels else [])
    for top, prefix in trees:
        for path in sorted(top.rglob("*.py")):
            parts = prefix + path.relative_to(top).with_suffix("").parts
            init = parts[-1] == "__init__"
            if init:
                parts = parts[:-1]
            if parts:
                found[".".join(parts)] = (path, init)
    return found


def targets(node, here: str, init: bool, known, package: str = "ifad_fast") -> set[str]:
    """The modules of `known` that one import statement of module `here` names."""
    if isinstance(node, ast.Import):
        names = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == package]
        return {".".join(n) for n in names if n and ".".join(n) in known}
    if node.level == 0:
        if not node.module or node.module.split(".")[0] != package:
            return set()
        base = node.module.split(".")[1:]
    else:
        base = here.split(".") if init else here.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    found = set()
    for alias in node.names:
        submodule = ".".join(base + [alias.name])
        found.add(submodule if submodule in known else ".".join(base))
    return {t for t in found if t in known}


def unresolved(package: Path = PACKAGE, kernels: Path | None = KERNELS) -> list[str]:
    """The imports inside the package that name no module of it (a module moved or renamed, whose
    old name a function-level import still uses, fails only when that function runs)."""
    known = modules(package, kernels)
    missing = []
    for name, (path, init) in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module and not targets(node, name, init, known):
                missing.append(f"{path.relative_to(package.parent)}:{node.lineno} from {'.' * node.level}{node.module}")
    return missing


def with_packages(here: str, imported: set[str], known) -> set[str]:
    """`imported` plus the subpackage __init__s that importing them runs, outside `here`'s own."""
    out = set(imported)
    for name in imported:
        parts = name.split(".")
        for i in range(1, len(parts)):
            package = ".".join(parts[:i])
            if package in known and here != package and not here.startswith(package + "."):
                out.add(package)
    return out


def import_graph(package: Path = PACKAGE, kernels: Path | None = KERNELS) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (anywhere in the file)."""
    known = modules(package, kernels)
    graph = {}
    for name, (path, init) in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported |= targets(node, name, init, known)
        graph[name] = with_packages(name, imported, known) - {name}
    return graph


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


def upward(graph: dict[str, set[str]], layers=LAYERS) -> set[tuple[str, str]]:
    """The imports (importer, imported) that go to a higher layer than the importer's."""
    level = {m: i for i, (_, members) in enumerate(layers) for m in members}
    return {(a, b) for a, bs in graph.items() for b in bs if level[b] > level[a]}


def describe(found) -> str:
    return "; ".join(" <-> ".join(sorted(c)) for c in sorted(found, key=sorted)) or "none"


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    # a toy package: a function-level import, `from .. import`, `from . import` and `from .b import`
    # inside a subpackage, and the subpackage's __init__ run by an import from outside it
    files = {"__init__.py": "", "a.py": "def f():\n    from .sub import b\n", "c.py": "from . import a\n",
             "sub/__init__.py": "from .b import x\n", "sub/b.py": "from .. import a\nx = 1\n",
             "sub/d.py": "from . import b\nfrom ..c import a\n"}
    for name, text in files.items():
        (tmp_path / "ifad_fast" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ifad_fast" / name).write_text(text)
    graph = import_graph(tmp_path / "ifad_fast", None)
    assert graph == {"a": {"sub", "sub.b"}, "c": {"a"}, "sub": {"sub.b"}, "sub.b": {"a"}, "sub.d": {"sub.b", "c"}}
    assert cycles(graph) == {frozenset({"a", "sub", "sub.b"})}
    layers = (("low", {"a", "c"}), ("high", {"sub", "sub.b", "sub.d"}))
    assert upward(graph, layers) == {("a", "sub"), ("a", "sub.b")}
    (tmp_path / "ifad_fast" / "c.py").write_text("def f():\n    from .gone import a\n")
    assert unresolved(tmp_path / "ifad_fast", None) == ["ifad_fast/c.py:2 from .gone"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert {"api", "train", "backends.factory", "benchmarks.accuracy", "restore.slices"} <= graph["cli"]  # in functions
    assert {"backends.base", "backends.factory", "backends", "config", "restore.scoring",
            "restore.search", "restore.slices", "restore.core"} <= graph["restore.volume"]
    assert "restore.core" in graph["restore.slices"] and "restore.slices" not in graph["restore.core"]
    assert {"api.restorer", "api.jobs"} <= graph["api"]
    assert {"restore", "restore.volume", "restore.scoring"} <= graph["api.restorer"]  # the __init__ it runs
    assert "backends.triton" in graph["backends.factory"]                           # from . import triton
    assert "benchmarks.training" in graph["benchmarks.speed"]                       # from . import training
    assert {"backends.base", "backends.fast", "backends.triton", "backends.factory"} <= graph["backends"]
    assert {"kernels.numba_ops", "kernels.torch_ops"} <= graph["preprocess"]
    assert "kernels.triton_decoder" in graph["backends.triton"]                     # from ..kernels import


def test_backends_and_their_factory_form_no_cycle():
    graph = import_graph()
    assert not graph["backends.base"] & {"backends.fast", "backends.triton", "backends.factory", "backends"}
    for implementation in ("backends.fast", "backends.triton"):
        assert not {m for m in graph[implementation] if m.startswith("backends.")} - {"backends.base"}
    assert {"backends.base", "backends.fast", "backends.triton"} <= graph["backends.factory"]


def test_every_module_sits_in_one_layer():
    placed = [m for _, members in LAYERS for m in members]
    assert len(placed) == len(set(placed)), sorted(m for m in placed if placed.count(m) > 1)
    known = set(modules())
    assert not known - set(placed), f"place these modules in a layer: {sorted(known - set(placed))}"
    assert not set(placed) - known, f"no such modules (drop them from LAYERS): {sorted(set(placed) - known)}"


def test_every_relative_import_names_a_module():
    assert not unresolved(), unresolved()


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {describe(found)}"


def test_kernels_import_nothing_of_ifad_fast():
    graph = import_graph()
    kernels = {m for m in graph if m == "kernels" or m.startswith("kernels.")}
    for m in kernels:
        assert graph[m] <= kernels, f"{m} imports {sorted(graph[m] - kernels)}"
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}:{node.lineno} imports above kernels/"
                assert not (node.module or "").startswith("ifad_fast"), f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.split(".")[0] == "ifad_fast"]
                assert not bad, f"{path.name}:{node.lineno} imports {bad}"


def test_no_import_goes_up_a_layer():
    found = upward(import_graph())
    new, gone = found - set(KNOWN_UPWARD), set(KNOWN_UPWARD) - found
    assert not new, f"imports up a layer: {sorted(new)}"
    assert not gone, f"no longer imported (drop from KNOWN_UPWARD): {sorted(gone)}"


def test_the_public_import_paths_still_work():
    import ifad_fast.backends as backends
    import ifad_fast.restore as restore
    from ifad_fast.backends import base, factory, fast, triton
    from ifad_fast.restore import scoring, search, volume

    for name in backends.__all__:
        assert getattr(backends, name) is next(getattr(m, name) for m in (base, fast, triton, factory)
                                               if hasattr(m, name)), name
    for name in restore.__all__:
        assert getattr(restore, name) is getattr(volume, name), name     # restore.py's names, as before
    assert {"restore_batch", "restore_classes", "optimise_latents", "postprocess"} <= set(restore.__all__)
    assert search.optimise_latents is restore.optimise_latents and scoring.postprocess is restore.postprocess
