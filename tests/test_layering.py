"""Who imports whom (DESIGN.md): the device side and the cloud side never import each
other; only the composition root (edgefl/) may import both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of ``package`` imports (module path -> names)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("cloud", {"edge_node", "edgefl"}),
    ("edge_node", {"cloud", "edgefl"}),
    ("schemas", {"cloud", "edge_node", "edgefl", "broker"}),
    ("fl_tasks", {"cloud", "edge_node", "edgefl", "broker"}),
    ("broker", {"cloud", "edge_node", "edgefl"}),
])
def test_sides_do_not_import_each_other(package: str, forbidden: set[str]) -> None:
    offenders = {module: sorted(names & forbidden)
                 for module, names in imported_packages(package).items() if names & forbidden}
    assert not offenders, f"{package} must not import {sorted(forbidden)}: {offenders}"
