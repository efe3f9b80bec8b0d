"""The package's import graph has no cycle, function-level imports included.

The one allowed edge back is the method registry's plugin import (`kvlab.quant.registry` imports
`kvlab.quant.methods` so every method file registers itself). Computed from the AST of every module;
imports under `if TYPE_CHECKING:` are annotations only (never executed) and are left out.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvlab"
ALLOWED = {("kvlab.quant.registry", "kvlab.quant.methods")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(current: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """module -> the kvlab modules it imports (anywhere in the file); `from pkg import name` counts as
    importing pkg.name when that is a module, else pkg."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:          # kvlab.x.y.attr -> the module that holds it
                    t = t.rpartition(".")[0]
                if t.startswith("kvlab") and t != mod and (mod, t) not in ALLOWED:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kvlab_import_graph_has_no_cycle():
    graph = import_graph()
    assert "kvlab.hooks" in graph and graph["kvlab.hooks"], "the graph builder found no imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_methods_never_import_the_core():
    """A method file depends on the method layer only (base, primitives, registry), never on the core."""
    graph = import_graph()
    core = ("kvlab.hooks", "kvlab.core", "kvlab.protocols", "kvlab.evaluation")
    for mod, deps in graph.items():
        if mod.startswith("kvlab.quant.methods."):
            bad = sorted(d for d in deps if d.startswith(core))
            assert not bad, f"{mod} imports the core: {bad}"
