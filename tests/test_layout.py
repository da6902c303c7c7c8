"""The package's import graph reads one way: no cycle, and the runtime path (capture -> signatures ->
detectors -> generation -> refinement) never imports the research workflows or the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_flowcheck

ROOT = Path(hf_flowcheck.__file__).parent
OFF_RUNTIME = ("hf_flowcheck.workflows", "hf_flowcheck.cli")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the hf_flowcheck modules it imports (at any depth of the file, lazy imports included)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hf_flowcheck"):
                base = node.module
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("hf_flowcheck"))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_runtime_path_never_imports_workflows_or_cli() -> None:
    graph = _imports()
    runtime = [m for m in graph if not m.startswith(OFF_RUNTIME) and m != "hf_flowcheck.__main__"]
    bad = {m: sorted(d for d in graph[m] if d.startswith(OFF_RUNTIME)) for m in runtime}
    assert not {m: d for m, d in bad.items() if d}, "runtime modules import workflows/cli"


def test_no_import_cycle() -> None:
    graph = _imports()
    # Package __init__ files re-export their children; an edge into a package is not a cycle through it.
    edges = {m: {d for d in deps if not (m.startswith(d + ".") or d.startswith(m + "."))} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d) :], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_public_modules_declare_all() -> None:
    missing = [
        _module_name(p)
        for p in ROOT.rglob("*.py")
        if not p.name.startswith("_") and "__all__" not in p.read_text() and p.name != "version.py"
    ]
    assert not missing, f"modules without __all__: {missing}"
