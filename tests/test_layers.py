"""The import map of lightning_rlm has layers: no cycle between its packages, and the building blocks never
import the methods, callbacks or commands built from them.

Every module is parsed (nothing imported), and every import counts, also those inside functions: a lazy
import is still a dependency, only a later one. A node is a subpackage (`data`, `models`, ...) or a
top-level module (`paths`, `optim`, `cli`, ...).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import lightning_rlm

PACKAGE = Path(lightning_rlm.__file__).resolve().parent
ROOT = PACKAGE.name  # "lightning_rlm"

# What methods and callbacks are built from; none of them may import the layers above.
LOWER = {"data", "models", "rollout", "losses", "rewards", "metrics", "adapters", "tasks",
         "paths", "checks", "optim", "distributed", "logging_utils"}
UPPER = {"methods", "callbacks", "cli", "workflow", "main", "__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """The lightning_rlm modules that `path` imports anywhere in its body."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb from this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from lightning_rlm import paths` imports the module lightning_rlm.paths
            found.update(f"{module}.{a.name}" for a in node.names if is_module(f"{module}.{a.name}"))
    return {m for m in found if m == ROOT or m.startswith(ROOT + ".")}


def node(module: str) -> str:
    """The subpackage or top-level module a module belongs to ("" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph() -> dict[str, dict[str, list[str]]]:
    """node -> imported node -> ["importer -> imported", ...] (edges between different nodes only)."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported in imported_modules(path):
            a, b = node(importer), node(imported)
            if a and b and a != b:
                graph[a][b].append(f"{importer} -> {imported}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of nodes (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, {})):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)) is not None:
                return cycle
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)) is not None:
            return cycle
    return None


def test_the_parser_sees_lazy_imports():
    graph = package_graph()
    # function-level imports count: tokenizers resolve `lrlm:` names through the models package
    assert any("lightning_rlm.data.tokenizers -> lightning_rlm.models.base_model" in e
               for e in graph["data"]["models"])
    assert set(graph["methods"]) >= {"data", "models", "rollout", "losses", "adapters"}


def test_no_import_cycle_between_packages():
    graph = package_graph()
    cycle = find_cycle(graph)
    if cycle is not None:
        edges = [e for a, b in zip(cycle, cycle[1:]) for e in graph[a][b]]
        raise AssertionError(f"import cycle {' -> '.join(cycle)}:\n  " + "\n  ".join(edges))


def test_lower_layers_never_import_methods_callbacks_or_commands():
    graph = package_graph()
    assert LOWER | UPPER >= set(graph) - {""}, f"new package, place it in a layer: {set(graph) - LOWER - UPPER}"
    upward = [e for a in LOWER for b in UPPER for e in graph.get(a, {}).get(b, [])]
    assert not upward, "a building block imports a layer above it:\n  " + "\n  ".join(upward)
