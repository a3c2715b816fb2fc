"""kvctl's own modules import each other without cycles, and none imports another's private names.

The graph is read from the source (ast), so it holds every import a module can run:
top-level ones, those inside functions (a cycle hidden by a function-level import is still
a cycle), and `kvctl.lazy.lazy_module("kvctl.x")`. Imports under `if TYPE_CHECKING:` never
run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kvctl"


def module_names(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module in the package at `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (its `else:` does run)."""
    found: list[ast.AST] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, list[str]]:
    """{imported module of this package: the names taken from it} for the module `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, list[str]] = {}

    def add(target: str, names: list[str]) -> None:
        while target and target not in modules:  # `import kvctl.x.Name`-like: the module that holds it
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, []).extend(names)

    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    add(submodule, [])
                else:
                    add(base, [alias.name])
        elif isinstance(node, ast.Call) and any(isinstance(n, ast.Name) and n.id == "lazy_module" for n in [node.func, *node.args]):
            # lazy_module("kvctl.x"), or map(lazy_module, ("kvctl.x", ...))
            for constant in ast.walk(node):
                if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                    add(constant.value, [])
    return found


def import_graph(root: Path) -> dict[str, dict[str, list[str]]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One cycle (a → b → … → a) for each group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(group, graph) for group in groups]


def _cycle_through(group: list[str], graph: dict[str, dict[str, list[str]]]) -> list[str]:
    """The shortest way from the group's first module back to itself, inside the group."""
    start = group[0]
    paths = {nxt: [start, nxt] for nxt in graph[start] if nxt in group}
    while start not in paths:
        paths = {nxt: [*path, nxt] for last, path in paths.items() for nxt in graph[last] if nxt in group and nxt not in paths} | paths
    return paths[start]


def test_kvctl_has_no_import_cycles() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles:\n" + "\n".join(" → ".join(cycle) for cycle in found)


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{name} imports {target}.{imported}"
        for name, targets in import_graph(PACKAGE).items()
        for target, names in targets.items()
        for imported in names
        if imported.startswith("_") and not imported.startswith("__")
    ]
    assert not private, "\n".join(private)


def test_the_graph_sees_function_level_and_lazy_imports(tmp_path: Path) -> None:
    """The checks above can fail: a cycle closed only inside a function, or through
    lazy_module, is found, and so is a private name taken from another module."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import _hidden\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\nelse:\n    a = lazy_module('pkg.a')\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.c": ["_hidden"]}
    assert graph["pkg.c"] == {"pkg.a": []}  # the TYPE_CHECKING import is not an edge
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


@pytest.mark.parametrize(("module", "target"), [("kvctl.cli", "kvctl.display"), ("kvctl.tree", "kvctl.render"), ("kvctl.cli", "kvctl.tree")])
def test_the_graph_of_kvctl_has_the_known_edges(module: str, target: str) -> None:
    # kvctl.tree imports render inside `up`; kvctl.cli imports tree through lazy_module.
    assert target in import_graph(PACKAGE)[module]
