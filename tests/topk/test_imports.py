"""topk's modules import one another one way only: no cycles, imports inside functions included.

Read from the source (ast), not from sys.modules: an import inside a function counts as much as
one at the top of a module. Only the explicit edges count: `from topk.sampling import x` is an
edge to topk.sampling, not to the package topk whose __init__ runs first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import topk

TOPK_ROOT = Path(topk.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(TOPK_ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the topk modules it imports, anywhere in its source."""
    paths = {module_name(path): path for path in TOPK_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t for t in submodules if t in paths] or [node.module]
            else:
                continue
            graph[name].update(t for t in targets if t in paths and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            cycle = visit(target, [*path, name])
            if cycle:
                return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle:
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    # topk.selection_launch imports the Triton kernels on first use only, inside a function.
    assert "topk.selection_kernels" in import_graph()["topk.selection_launch"]


def test_topk_has_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
