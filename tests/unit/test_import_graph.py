"""The import graph of `unite_core` and `pipelines` has no cycle.

Every .py file of the two packages is parsed with `ast`; each import of an in-package module is an
edge. Module-level imports (also inside `try`, `if` and class bodies; `if TYPE_CHECKING:` blocks are
left out, they never run) must form an acyclic graph. Function-level (lazy) imports are allowed for
speed or to avoid a heavy dependency at import time, but none of them may close a cycle either: a
lazy import of module B from module A fails the test when B imports A back, directly or through
others (module-level or lazy edges). The one exception is an import statement marked on its first
line with the comment `# heavy optional dependency` (ALLOW_MARK); such an edge is still listed, and
the marker is meant for imports whose laziness keeps e.g. RDKit or matplotlib out of the importer's
import time, not for cycles.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("unite_core", "pipelines")
ALLOW_MARK = "# heavy optional dependency"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported in-package module
    line: int
    lazy: bool  # inside a function
    allowed: bool  # marked with ALLOW_MARK


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Yield (node, lazy) for each Import/ImportFrom and each `import_module("...")` call."""

    def visit(node: ast.AST, lazy: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from visit_one(sub, lazy)
                continue
            yield from visit_one(child, lazy)

    def visit_one(child: ast.AST, lazy: bool):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, lazy
        elif (isinstance(child, ast.Call) and isinstance(child.func, (ast.Name, ast.Attribute))
              and (getattr(child.func, "id", None) or getattr(child.func, "attr", None)) == "import_module"
              and child.args and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
            yield child, lazy
        inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from visit(child, inner)

    yield from visit(tree, False)


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """In-package modules an import statement loads (the named module and its packages)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.Call):
        names = [node.args[0].value]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import name`: name is a submodule when such a file exists, else an attribute
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
    out = []
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            # a module's own packages are already being imported: no edge to them
            if candidate in known and not (module == candidate or module.startswith(candidate + ".")):
                out.append(candidate)
    return out


def import_graph(root: Path = ROOT) -> list[Edge]:
    files = module_files(root)
    known = set(files)
    edges: set[Edge] = set()
    for module, path in files.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        for node, lazy in _imports(tree):
            allowed = ALLOW_MARK in lines[node.lineno - 1]
            for target in _targets(node, module, path.name == "__init__.py", known):
                if target != module:
                    edges.add(Edge(module, target, node.lineno, lazy, allowed))
    return sorted(edges, key=lambda e: (e.source, e.line, e.target))


def find_cycle(adjacency: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(adjacency.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(adjacency):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def reaches(adjacency: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal, or None."""
    parent = {start: None}
    todo = [start]
    while todo:
        node = todo.pop()
        if node == goal:
            path = [node]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return path[::-1]
        for nxt in sorted(adjacency.get(node, ())):
            if nxt not in parent:
                parent[nxt] = node
                todo.append(nxt)
    return None


def _adjacency(edges) -> dict[str, set[str]]:
    adj: dict[str, set[str]] = {}
    for e in edges:
        adj.setdefault(e.source, set()).add(e.target)
    return adj


def check(root: Path = ROOT) -> list[str]:
    """Problems found: module-level cycles and lazy imports that close a cycle."""
    edges = import_graph(root)
    problems = []
    cycle = find_cycle(_adjacency(e for e in edges if not e.lazy))
    if cycle:
        problems.append("module-level import cycle: " + " -> ".join(cycle))
    everything = _adjacency(edges)
    for e in edges:
        if e.lazy and not e.allowed:
            back = reaches(everything, e.target, e.source)
            if back:
                problems.append(f"lazy import in {e.source} (line {e.line}) of {e.target} closes a cycle: "
                                + " -> ".join([e.source, *back]))
    return problems


def test_the_graph_is_read():
    edges = import_graph()
    assert len(module_files()) > 50
    assert any(e.source == "pipelines.cli" for e in edges)
    assert any(e.source == "unite_core.model" and e.target == "unite_core.encoder" for e in edges)


def test_no_import_cycle():
    assert check() == []


def test_the_marker_is_only_on_function_level_imports():
    """ALLOW_MARK on a module-level import would mean nothing (those may never close a cycle)."""
    marked = [f"{e.source} line {e.line}" for e in import_graph() if e.allowed and not e.lazy]
    assert marked == []


@pytest.mark.parametrize("lazy", [False, True])
def test_a_cycle_is_found(tmp_path, lazy):
    """A small package with a cycle (a module-level one, or one closed by a function-level import)."""
    pkg = tmp_path / "unite_core"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    body = "def f():\n    from .. import a\n" if lazy else "from unite_core import a\n"
    (pkg / "sub" / "b.py").write_text(body)
    problems = check(tmp_path)
    assert len(problems) == 1
    assert "unite_core.a -> unite_core.sub.b" in problems[0] and "unite_core.sub.b -> unite_core.a" in problems[0]
    assert problems[0].startswith("lazy import in unite_core.sub.b" if lazy else "module-level import cycle")
    (pkg / "sub" / "b.py").write_text(body.replace("import a", f"import a  {ALLOW_MARK}") if lazy else "")
    assert check(tmp_path) == []


def layer_violations(edges) -> list[str]:
    """The layering docs/ARCHITECTURE.md states: unite_core never imports pipelines; a stage module never
    imports another stage (stages share pipelines/context.py, evaluation.py, ... below them); nothing
    below the stages imports a stage (only the CLI and the stage runner, pipelines/stages/__init__.py, do)."""
    out = []
    for e in edges:
        stage = e.target.startswith("pipelines.stages.") and e.target != "pipelines.stages"
        if e.source.startswith("unite_core") and e.target.startswith("pipelines"):
            out.append(f"{e.source}:{e.line} imports {e.target} (unite_core never imports pipelines)")
        elif stage and e.source.startswith("pipelines.stages.") and e.source != e.target:
            out.append(f"{e.source}:{e.line} imports the stage {e.target} (stages are peers)")
        elif stage and not e.source.startswith(("pipelines.stages", "pipelines.cli")):
            out.append(f"{e.source}:{e.line} imports the stage {e.target} (only the CLI and the runner do)")
    return out


def test_the_layers_import_downwards_only():
    assert layer_violations(import_graph()) == []
    # and the rule is live: a stage importing a stage is reported
    fake = [Edge("pipelines.stages.compare", "pipelines.stages.evaluate", 3, False, False),
            Edge("unite_core.model", "pipelines.tracking", 9, True, False)]
    assert len(layer_violations(fake)) == 2
