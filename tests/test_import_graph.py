"""The import graph of `worker/`, `tasks/` and `beat_schedule.py` has no circle.

Read from the source (every `import`, also those inside functions and under
`TYPE_CHECKING`), twice: module by module, and with each subpackage of
`worker` (`worker.broker`, `worker.cli`, `worker.metrics`, `worker.sinks`)
taken as one unit, so that an import from a subpackage up to a module that
depends on that subpackage is a circle too. And `worker/` never imports `tasks/`.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(root: Path) -> dict[str, Path]:
    files = [*(root / "worker").rglob("*.py"), *(root / "tasks").rglob("*.py")]
    files.append(root / "beat_schedule.py")
    return {_module_name(path, root): path for path in files}


def _imported(tree: ast.AST, package: str, modules: Collection[str]) -> Iterator[str]:
    """The module each import statement of `tree` takes a name from, made absolute:
    `from a import b` takes module `a.b` where there is one, else a name of `a`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in modules else base


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of this tree it imports."""
    sources = _sources(root)
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {
            target
            for target in _imported(tree, package, sources)
            if target in sources and target != name
        }
    return graph


def _unit(module: str) -> str:
    """A module of `worker`, or the subpackage of `worker` it belongs to."""
    parts = module.split(".")
    return ".".join(parts[:2])


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _edges_within(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    return sorted(f"{a} -> {b}" for a in component for b in graph.get(a, ()) if b in component)


def test_no_module_imports_in_a_circle() -> None:
    graph = import_graph(ROOT)
    # The walk sees the tree: the library, the tasks and the Beat schedule.
    assert "worker.settings" in graph and "beat_schedule" in graph
    assert any(name.startswith("tasks.") for name in graph)
    assert [_edges_within(graph, c) for c in circles(graph)] == []


def test_no_subpackage_imports_a_module_that_depends_on_it() -> None:
    graph = import_graph(ROOT)
    units: dict[str, set[str]] = {}
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        for target in targets:
            if _unit(module) != _unit(target):
                units.setdefault(_unit(module), set()).add(_unit(target))
                edges.setdefault(f"{_unit(module)} -> {_unit(target)}", set()).add(
                    f"{module} -> {target}"
                )
    found = [
        sorted(imp for edge in _edges_within(units, c) for imp in edges[edge])
        for c in circles(units)
    ]
    assert found == []


def test_worker_never_imports_tasks() -> None:
    graph = import_graph(ROOT)
    assert (
        sorted(
            f"{module} -> {target}"
            for module, targets in graph.items()
            if module.startswith("worker")
            for target in targets
            if target == "tasks" or target.startswith("tasks.")
        )
        == []
    )
