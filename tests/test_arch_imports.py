"""The package's import graph, drawn from the sources (ast): no module is part of an import circle, and neither is
any room (a top-level module or subpackage of alignclip: ``alignclip.data``, ``alignclip.config`` ...).

Every import counts, at module top or inside a function: a function-level import hides a circle from Python's
start-up, not from a reader. Importing ``alignclip.x.y`` also runs ``alignclip/x/__init__.py``, so it is an edge to
the package too. The root package is left out as a source: its ``load`` imports ``alignclip.export`` when called,
so that ``import alignclip`` stays light.
"""

from __future__ import annotations

import ast
from pathlib import Path

import alignclip

PACKAGE = Path(alignclip.__file__).parent

# Edges that close a circle today, each with the change that removes it. An entry that no longer exists
# fails the test: delete it. (A module importing ``alignclip.x.y`` has an edge to ``alignclip.x`` too.)
PENDING: set[tuple[str, str]] = set()


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (the longest known prefix of each imported name)."""
    names = module_names()

    def known(name: str) -> str | None:
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        targets = graph.setdefault(module, set())
        if module == "alignclip":
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            imported = []
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                imported = [f"{base}.{a.name}" for a in node.names]
            for name in imported:
                target = known(name) if name.startswith("alignclip.") else None
                while target and target != "alignclip":  # the module and every package whose __init__ it runs
                    if target != module and not module.startswith(target + "."):
                        targets.add(target)
                    target = target.rpartition(".")[0]
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def without_pending(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in targets if (m, t) not in PENDING} for m, targets in graph.items()}


def test_the_pending_edges_still_exist():
    graph = import_graph()
    gone = sorted(edge for edge in PENDING if edge[1] not in graph.get(edge[0], ()))
    assert not gone, f"these imports are gone: delete them from PENDING: {gone}"


def test_no_module_is_in_an_import_circle():
    assert not circles(without_pending(import_graph()))


def test_no_room_is_in_an_import_circle():
    rooms: dict[str, set[str]] = {}
    for module, targets in without_pending(import_graph()).items():
        if module != "alignclip":
            rooms.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    found = circles(rooms)
    edges = {c: sorted(f"{m} -> {t}" for m, ts in import_graph().items() for t in ts
                       if room(m) in c and room(t) in c and room(m) != room(t)) for c in map(tuple, found)}
    assert not found, f"rooms importing each other: {edges}"


def test_the_graph_sees_a_circle():
    """The check itself: a circle through a function-level import and through a package __init__ is found."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "alignclip.data" in graph["alignclip.semantic"]  # from alignclip.data.shards import ...: the __init__ too
    assert "alignclip.prompts" in graph["alignclip.embeddings"]
