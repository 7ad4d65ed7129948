"""The tree reads as the architecture: every import goes to the module's own layer or one above it (the order
of docs/architecture.md), no import cycles, no module-level import after the first definition, and imports
inside functions only where laziness is the point (the command line's parser)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "pyvhost"
DOC = ROOT / "docs" / "architecture.md"
#: modules whose function-level imports are deliberate: the parser must answer without loading the datapath
LAZY_BY_DESIGN = {
    "pyvhost.cli",
    "pyvhost.devices.builtin",
    "pyvhost.bench",
    "pyvhost.bench.net",
    "pyvhost.bench.blk",
    "pyvhost.bench.scsi",
    "pyvhost.bench.guests",
}


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def layers() -> dict[str, int]:
    """Module -> layer index, from the table of docs/architecture.md."""
    out: dict[str, int] = {}
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and "`" in line]
    for i, row in enumerate(rows):
        for name in re.findall(r"`([\w.]+)`", row.split("|")[2]):
            out["pyvhost." + name] = i
    return out


def imports(name: str, path: Path) -> list[tuple[str, int, bool, bool]]:
    """(imported pyvhost module, line, inside a function, under TYPE_CHECKING) for each import."""
    mods = modules()
    tree = ast.parse(path.read_text())
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []

    def visit(node: ast.AST, in_func: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = typing_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name in mods:
                        found.append((a.name, child.lineno, in_func, typing_only))
            elif isinstance(child, ast.ImportFrom):
                base = pkg[: len(pkg) - child.level + 1] if child.level else []
                mod = ".".join(base + ([child.module] if child.module else []))
                for a in child.names:
                    sub = f"{mod}.{a.name}"
                    target = sub if sub in mods else mod
                    if target in mods:
                        found.append((target, child.lineno, in_func, typing_only))
            visit(child, func, tc)

    visit(tree, False, False)
    return found


def test_every_module_has_a_layer():
    missing = sorted(set(modules()) - set(layers()) - {"pyvhost", "pyvhost.ring", "pyvhost.devices"})
    assert missing == [], f"add these to the table of {DOC.name}: {missing}"


def test_imports_go_down_the_layers():
    lay = layers()
    bad = []
    for name, path in modules().items():
        for target, line, _, typing_only in imports(name, path):
            if not typing_only and name in lay and target in lay and lay[target] > lay[name]:
                bad.append(f"{name}:{line} imports {target} (a layer below it in {DOC.name})")
    assert bad == []


def test_no_import_cycles():
    graph = {
        name: {t for t, _, _, tc in imports(name, path) if not tc and t != name} for name, path in modules().items()
    }
    # a package's __init__ is imported with each of its modules: that edge is not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycles = []
    state: dict[str, int] = {}

    def dfs(n: str, stack: list[str]) -> None:
        state[n] = 1
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                dfs(t, stack + [t])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n, [n])
    assert cycles == []


def test_imports_come_first():
    bad = []
    for name, path in modules().items():
        seen_def = None
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and seen_def is None:
                seen_def = node.name
            if isinstance(node, (ast.Import, ast.ImportFrom)) and seen_def is not None:
                bad.append(f"{name}:{node.lineno} imports after {seen_def}")
    assert bad == []


def test_imports_inside_functions_only_where_laziness_is_the_point():
    bad = [
        f"{name}:{line} imports {target} inside a function"
        for name, path in modules().items()
        if name not in LAZY_BY_DESIGN
        for target, line, in_func, _ in imports(name, path)
        if in_func
    ]
    assert bad == []
