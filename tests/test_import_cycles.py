"""No import cycle among the launcher's modules (launchers/), function-local imports included.

A cycle makes the order of imports matter and hides which module is the lower layer; the SLURM
vocabulary (launchers/slurm.py) sits below every backend and below launchers/sweep.py.
`from package import module` counts as an edge to the module; a package's __init__ is not counted
as a dependency of its own submodules (Python runs it first, and backends/__init__.py is a
registry that imports each backend on demand).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str = "launchers") -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source."""
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = {f"{node.module}.{alias.name}" for alias in node.names} & paths.keys()
                targets.update(subs or {node.module})
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_launcher_has_no_import_cycle():
    graph = import_graph(REPO)
    assert "launchers.slurm" in graph and "launchers.backends.sbatch" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_slurm_vocabulary_imports_no_backend_and_no_sweep():
    below = import_graph(REPO)["launchers.slurm"]
    assert not {m for m in below if m.startswith("launchers.backends") or m == "launchers.sweep"}


def test_a_cycle_is_found(tmp_path):
    """The check itself: a function-local import back to the importer is a cycle."""
    pkg = tmp_path / "launchers"
    (pkg / "backends").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "backends" / "__init__.py").write_text("")
    (pkg / "sweep.py").write_text("def f():\n    from launchers.backends.sbatch import g\n")
    (pkg / "backends" / "sbatch.py").write_text("def g():\n    from launchers import sweep\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle == ["launchers.backends.sbatch", "launchers.sweep", "launchers.backends.sbatch"]
