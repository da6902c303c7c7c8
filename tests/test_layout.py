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


def _declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return [ast.literal_eval(e) for e in node.value.elts]  # a literal list of names
    return None


def _defined_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def test_public_modules_declare_all() -> None:
    """Every public module and package declares a literal __all__ whose names it defines or imports."""
    problems = []
    for p in sorted(ROOT.rglob("*.py")):
        if (p.name.startswith("_") and p.name != "__init__.py") or p.name == "version.py":
            continue
        tree = ast.parse(p.read_text())
        declared = _declared_all(tree)
        if declared is None:
            problems.append(f"{_module_name(p)}: no __all__")
            continue
        undefined = sorted(set(declared) - _defined_names(tree))
        if undefined:
            problems.append(f"{_module_name(p)}: __all__ names {undefined} it does not define")
    assert not problems, problems


def _parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = fn.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def test_modules_and_signatures_stay_small() -> None:
    """No module over 800 lines and no function with more than 12 parameters (options belong in a config
    dataclass: ``TrainConfig``, ``ExtractConfig``, ``AnswerDecoding``, ``GenerationTiming`` ...)."""
    long_modules, wide = [], []
    for p in sorted(ROOT.rglob("*.py")):
        text = p.read_text()
        if text.count("\n") > 800:
            long_modules.append(f"{_module_name(p)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _parameter_count(node) > 12:
                wide.append(f"{_module_name(p)}.{node.name}: {_parameter_count(node)} parameters")
    assert not long_modules, long_modules
    assert not wide, wide


def test_benchmarks_and_examples_use_public_names_only() -> None:
    """Benchmarks and examples are what users copy: they import no private ``hf_flowcheck`` name."""
    private = []
    for folder in ("benchmarks", "examples"):
        for p in sorted((ROOT.parent / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_flowcheck"):
                    private += [f"{p.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private
