"""The package's import graph has no cycles between its rooms (top-level modules and subpackages: loader/,
kernels/, engine/, quantize.py, load.py, ...). A cycle is how a format module ends up importing a transform,
or a transform the loader that calls it (as loader/load.py <-> quantize.py once did). Read from the source
with ast, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import lanternlm

ROOT = Path(lanternlm.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The lanternlm modules `name` imports (`from . import x` names module x, not the package)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            out.update(submodules or ([target] if target in known else []))
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
    return out - {name}


def room(name: str) -> str:
    return ".".join(name.split(".")[:2])


def room_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        if name == "lanternlm":  # the package's front door re-exports the API
            continue
        for target in imports(name, path, known):
            if room(target) != room(name) and target != "lanternlm":
                graph.setdefault(room(name), set()).add(room(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one room (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_rooms():
    graph = room_graph()
    assert "lanternlm.quantize" in graph.get("lanternlm.load", set())  # the graph is read at all
    assert cycles(graph) == []


def test_formats_import_no_transform():
    graph = room_graph()
    assert not graph.get("lanternlm.loader", set()) & {"lanternlm.quantize", "lanternlm.fused", "lanternlm.load"}
