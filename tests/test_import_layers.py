"""The package's layers import downward only: no two top-level packages of graphcap import each other, directly
or through others (imports under `if TYPE_CHECKING:` are annotations, not dependencies, and are left out)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import graphcap

ROOT = Path(graphcap.__file__).parent


def _runtime_imports(tree: ast.Module):
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files that import it."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for file in ROOT.rglob("*.py"):
        parts = file.relative_to(ROOT).parts
        if len(parts) == 1:  # graphcap/__init__.py, cli.py, config.py...: the top floor, above every package
            continue
        for module in _runtime_imports(ast.parse(file.read_text())):
            names = module.split(".")
            if names[0] == "graphcap" and len(names) > 1 and (ROOT / names[1]).is_dir() and names[1] != parts[0]:
                graph[parts[0]][names[1]].add(str(file.relative_to(ROOT)))
    return graph


def find_cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_cycle_between_packages():
    graph = package_graph()
    cycle = find_cycle(graph)
    if cycle:
        hops = [f"{a} -> {b} ({', '.join(sorted(graph[a][b]))})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between packages:\n  " + "\n  ".join(hops))


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b": {"x"}}, "b": {"c": {"y"}}, "c": {"a": {"z"}}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": {"x"}}, "b": {}}) is None
