"""The package layout is the architecture: data flows one way, from the model up to the front ends.

Every module's imports (at module level or inside functions; `if TYPE_CHECKING:` blocks are annotations
only) are read from its source. None may reach a higher layer, and no chain of imports may come back to
where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qktrace

SRC = Path(qktrace.__file__).parent

# bottom to top; a module belongs to the longest prefix listed
LAYERS: list[tuple[str, ...]] = [
    ("qktrace.errors", "qktrace.nodes", "qktrace.config", "qktrace.options", "qktrace.files", "qktrace.tables"),
    ("qktrace.models",),
    ("qktrace.saes",),
    ("qktrace.qk", "qktrace.graph"),
    ("qktrace.steering",),
    ("qktrace.analyses",),
    ("qktrace.tracer",),
    ("qktrace.jobs",),
    ("qktrace.server",),
    ("qktrace.demo",),
    ("qktrace.cli",),
    ("qktrace.testing",),
    ("qktrace",),
]
ENTRY_POINTS = {"qktrace.__main__", "qktrace.server.__main__"}  # scripts: run, never imported


def module_name(path: Path) -> str:
    parts = ["qktrace", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def layer(module: str) -> int:
    best = max(
        ((i, len(prefix)) for i, group in enumerate(LAYERS) for prefix in group
         if module == prefix or module.startswith(prefix + ".")),
        key=lambda t: t[1],
    )  # fmt: skip
    return best[0]


def _runtime_nodes(tree: ast.AST):  # type: ignore[no-untyped-def]
    """Every node outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "qktrace"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qktrace":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs if subs else {target}
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports(m) for m in MODULES if m not in ENTRY_POINTS}


def test_every_module_has_a_layer():
    assert all(layer(m) >= 0 for m in GRAPH)
    assert "qktrace.models.model" in GRAPH and "qktrace.cli" in GRAPH  # the walk found the package


def test_no_upward_import():
    upward = sorted(
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in GRAPH.items() for t in targets
        if layer(t) > layer(m)
    )  # fmt: skip
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_walk_sees_a_planted_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a cycle and an upward import planted in a copy of the graph are found."""
    planted = {m: set(t) for m, t in GRAPH.items()}
    planted["qktrace.models.model"].add("qktrace.tracer")
    assert any(layer(t) > layer(m) for m, ts in planted.items() for t in ts)
    monkeypatch.setattr(__import__(__name__, fromlist=["GRAPH"]), "GRAPH", planted)
    try:
        test_no_import_cycle()
    except AssertionError:
        return
    raise AssertionError("a planted cycle was not found")
