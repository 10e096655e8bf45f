"""Imports point one way: share <- subspace_store <- {workers, coordinator} <- jobs <- benchmarks.

Every module of our packages is parsed with ``ast`` (imports inside functions included, since a
lazy import is still a dependency) and each absolute import of one of our packages is checked
against the allowed graph. A wrong-way import fails here, naming the file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("share", "subspace_store", "workers", "coordinator", "jobs", "benchmarks")
# Package -> the packages of ours it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "share": set(),
    "subspace_store": {"share"},
    "workers": {"share", "subspace_store"},
    "coordinator": {"share", "subspace_store"},
    "jobs": {"share", "subspace_store", "workers", "coordinator"},
    "benchmarks": {"share", "subspace_store", "workers", "coordinator", "jobs"},
}


def imported_packages(path: Path) -> list[tuple[int, str, str]]:
    """``(line, package of ours, the import as written)`` for every absolute import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue  # relative imports stay inside their own package
        for name in names:
            top = name.split(".", 1)[0]
            if top in OURS:
                found.append((node.lineno, top, name))
    return found


def wrong_way_imports(root: Path) -> list[str]:
    problems = []
    for package in OURS:
        for path in sorted((root / package).rglob("*.py")):
            for line, target, name in imported_packages(path):
                if target != package and target not in ALLOWED[package]:
                    problems.append(f"{path.relative_to(root)}:{line}: {package} imports {name}")
    return problems


def test_every_package_imports_only_downwards() -> None:
    problems = wrong_way_imports(ROOT)
    assert not problems, "wrong-way imports (see the allowed graph at the top of this file):\n" + "\n".join(problems)


def test_the_graph_has_no_cycles_and_workers_and_coordinator_stay_apart() -> None:
    assert "coordinator" not in ALLOWED["workers"] and "workers" not in ALLOWED["coordinator"]
    for package, allowed in ALLOWED.items():
        for other in allowed:
            assert package not in ALLOWED[other], f"{package} and {other} may import each other"


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        ("workers", "def f():\n    from jobs.schema import JobConfig\n", "2: workers imports jobs.schema"),
        ("coordinator", "import workers.models\n", "1: coordinator imports workers.models"),
        ("subspace_store", "from coordinator import Coordinator\n", "1: subspace_store imports coordinator"),
        ("share", "import subspace_store\n", "1: share imports subspace_store"),
        ("jobs", "from benchmarks import data_wordnet\n", "1: jobs imports benchmarks"),
    ],
)
def test_a_wrong_way_import_is_reported(tmp_path: Path, package: str, source: str, expected: str) -> None:
    for name in OURS:
        (tmp_path / name).mkdir()
    (tmp_path / package / "bad.py").write_text(source)
    (tmp_path / package / "fine.py").write_text("from . import bad\nimport share\nimport os\n")
    assert wrong_way_imports(tmp_path) == [f"{package}/bad.py:{expected}"]
