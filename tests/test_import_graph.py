"""Package structure: every module imports, the intra-package import graph has no cycle, no module imports
another module's private names, and no module is over 500 lines.

The graph is read from the source (AST), counting imports inside functions too: a lazy import that closes a
cycle is still a cycle in the design, even when it happens not to fail at import time.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
from pathlib import Path

import pytest

import allocmoe

PKG = "allocmoe"
ROOT = Path(allocmoe.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module under src/allocmoe."""
    out = {PKG: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix=PKG + "."):
        spec = info.module_finder.find_spec(info.name.rsplit(".", 1)[-1])
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        out[info.name] = Path(spec.origin)
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, level: int, module: str | None) -> str:
    """The absolute dotted name a (possibly relative) `from ... import` refers to."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]  # a module's relative imports start from its package
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, source: str | None = None) -> list[tuple[str, str | None, int]]:
    """(target module, imported name or None, line) for every intra-package import in module `name`
    (its file, or `source` when given)."""
    tree = ast.parse(MODULES[name].read_text() if source is None else source, filename=str(MODULES[name]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node.level, node.module)
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from . import plan`: an import of the submodule
                    found.append((sub, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def _graph(imports=None) -> dict[str, set[str]]:
    """Module -> the modules it imports. `imports` maps a module to its _imports() (default: read the files)."""
    imports = imports if imports is not None else {m: _imports(m) for m in MODULES}
    graph: dict[str, set[str]] = {m: set() for m in imports}
    for m, found in imports.items():
        for target, _, _ in found:
            while target not in graph and "." in target:  # `import allocmoe.x.name`: the module is allocmoe.x
                target = target.rsplit(".", 1)[0]
            if target not in graph:
                continue
            # importing a.b.c runs the package a/b/__init__ first: a dependency on that package too, unless the
            # importer is that package or lives inside it (a package's modules importing each other is the usual
            # layout)
            parts = target.split(".")
            for i in range(2, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg in graph and m != pkg and not m.startswith(pkg + "."):
                    graph[m].add(pkg)
            if target != m:
                graph[m].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None. Iterative DFS with colours."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {m: WHITE for m in graph}
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour[child] == GREY:
                return path[path.index(child):] + [child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def _tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other (strongly connected components of more than one module),
    each as one cycle through the group's first module, so a failure shows all of them at once."""
    out, seen = [], set()
    while (cycle := _find_cycle({k: v - seen for k, v in graph.items() if k not in seen})) is not None:
        # the whole component: modules reachable from the cycle's start that reach back to it
        start = cycle[0]
        fwd = _reach(graph, start)
        back = _reach({k: {a for a in graph if k in graph[a]} for k in graph}, start)
        comp = sorted(fwd & back)
        seen.update(comp)
        out.append(comp)
    return out


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    todo, seen = [start], {start}
    while todo:
        for n in graph[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_cycle_finder_finds_a_planted_cycle():
    # the checker itself must be able to fail
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    g = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"a"}}
    assert _tangles(g) == [["a", "b"], ["c", "d"]]


def test_relative_imports_resolve():
    assert _resolve("allocmoe.adapters", 2, "errors") == "allocmoe.errors"
    assert _resolve("allocmoe.adapters.base", 2, "errors") == "allocmoe.errors"
    assert _resolve("allocmoe.plan", 1, "errors") == "allocmoe.errors"
    assert _resolve("allocmoe.plan", 1, None) == "allocmoe"


def test_import_reader_sees_function_level_and_submodule_imports():
    src = ("import torch\n"
           "from . import plan, errors as e\n"
           "from .adapters.base import MoELayer\n"
           "def f():\n"
           "    from .patching import apply\n"
           "    import allocmoe.io\n")
    assert sorted(_imports("allocmoe.methods", src)) == sorted([
        ("allocmoe.plan", None, 2), ("allocmoe.errors", None, 2), ("allocmoe.adapters.base", "MoELayer", 3),
        ("allocmoe.patching", "apply", 5), ("allocmoe.io", None, 6)])


def test_graph_counts_the_package_an_outside_import_runs():
    imports = {"allocmoe": [], "allocmoe.adapters": [("allocmoe.distributed", "x", 1)],
               "allocmoe.adapters.sharding": [], "allocmoe.adapters.families": [("allocmoe.adapters.sharding", "y", 1)],
               "allocmoe.distributed": [("allocmoe.adapters.sharding", "z", 1)]}
    g = _graph(imports)
    # distributed -> adapters.sharding runs adapters/__init__, which imports distributed: a cycle
    assert g["allocmoe.distributed"] == {"allocmoe.adapters", "allocmoe.adapters.sharding"}
    assert _find_cycle(g) == ["allocmoe.adapters", "allocmoe.distributed", "allocmoe.adapters"]
    # a sibling inside the package: no edge to its own package
    assert g["allocmoe.adapters.families"] == {"allocmoe.adapters.sharding"}


def test_no_import_cycle():
    graph = _graph()
    cycle = _find_cycle(graph)
    tangles = _tangles(graph)
    assert cycle is None, ("import cycle: " + " -> ".join(cycle) + "\nmodules importing each other: "
                           + "; ".join(", ".join(t) for t in tangles))


def test_no_module_imports_another_modules_private_names():
    bad = []
    for m in MODULES:
        for target, imported, line in _imports(m):
            if imported and imported.startswith("_") and not imported.startswith("__") and target != m:
                bad.append(f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {imported} from {target}")
    assert not bad, "\n".join(bad)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_version_has_one_home():
    from allocmoe import _version

    assert allocmoe.__version__ == _version.__version__
    # the installed distribution's version (pyproject.toml) must agree with the one the code reports
    assert importlib.metadata.version("allocmoe") == _version.__version__
    importers = sorted(m for m in MODULES for t, n, _ in _imports(m) if n == "__version__" and t == PKG)
    assert not importers, f"modules importing __version__ from the package root (use ._version): {importers}"
