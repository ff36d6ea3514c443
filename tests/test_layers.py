"""The layers of DESIGN.md, enforced: street2shop > benchmarks > generation > retrieval > index.

A module may import its own layer and the ones below it, never one above, not even inside a function
(a function-level import hides the cycle until the day it runs). The test reads every module's source
with `ast`, so it sees imports that never execute in the suite.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("index", "retrieval", "generation", "benchmarks", "street2shop")  # bottom to top
RANK = {name: rank for rank, name in enumerate(LAYERS)}


def imported_modules(tree: ast.AST):
    """(line, absolute module name) of every import in ``tree``, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def upward_imports(layer: str):
    for path in sorted((REPO / layer).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module in imported_modules(tree):
            target = module.split(".")[0]
            if RANK.get(target, -1) > RANK[layer]:
                yield f"{path.relative_to(REPO)}:{line} imports {module}"


def test_imported_modules_sees_function_level_imports():
    tree = ast.parse("import os\ndef f():\n    from benchmarks.runner import run_benchmark\n    import index.presets\n")
    assert list(imported_modules(tree)) == [(1, "os"), (3, "benchmarks.runner"), (4, "index.presets")]


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_a_higher_one(layer):
    violations = list(upward_imports(layer))
    assert not violations, f"{layer}/ imports a higher layer ({' > '.join(reversed(LAYERS))}):\n" + "\n".join(
        violations
    )


def test_every_package_is_a_layer():
    """A new top-level package must take its place in LAYERS (and DESIGN.md) before it can be imported."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS), f"packages {sorted(packages - set(LAYERS))} have no layer"
