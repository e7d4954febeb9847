"""The package's imports flow one way: a walk over every module's imports (ast, function-level imports
included) finds no cycle, and no module imports a name only to re-export it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dictionary_learning"


def package_imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports anywhere in its body (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module == "dictionary_learning":
                names = [a.name for a in node.names]
            elif node.module and node.module.startswith("dictionary_learning."):
                names = [node.module.split(".")[1]]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("dictionary_learning.")
            )
    return {n for n in found if (PACKAGE / f"{n}.py").exists()} - {path.stem}


def graph() -> dict[str, set[str]]:
    return {p.stem: package_imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle [a, b, ..., a] of the directed graph, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_the_walk_sees_function_level_imports():
    # demo.py imports these inside functions only; evaluation's CLI lives in eval_report (no back edge)
    assert {"eval_report", "training", "eval_summary", "distributed"} <= package_imports(PACKAGE / "demo.py")
    assert "eval_report" not in graph()["evaluation"]


def test_package_imports_have_no_cycle():
    edges = graph()
    assert len(edges) > 10
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_no_import_kept_only_for_a_re_export():
    for path in sorted(PACKAGE.glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not (line.lstrip().startswith(("from ", "import ")) and "noqa: F401" in line), (
                f"{path.name}:{n}"
            )


def test_every_imported_name_exists():
    """Function-level imports run only when their function does (a subprocess, a CLI path): check that
    every name the package, its tests and benchmarks import from it exists where they look for it."""
    import importlib

    root = PACKAGE.parent
    files = [*PACKAGE.glob("*.py"), *(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py")]
    missing = []
    for path in sorted(files):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1 and path.parent == PACKAGE:
                target = f"dictionary_learning.{node.module}" if node.module else "dictionary_learning"
            elif (node.module or "").split(".")[0] == "dictionary_learning" and node.level == 0:
                target = node.module
            else:
                continue
            module = importlib.import_module(target)
            for alias in node.names:
                if not hasattr(module, alias.name) and not (PACKAGE / f"{alias.name}.py").exists():
                    missing.append(f"{path.name}:{node.lineno}: {target}.{alias.name}")
    assert not missing, missing
