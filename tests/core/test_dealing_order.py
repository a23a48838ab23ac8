"""The suite's dealing order (tests/conftest.py) names tests that exist: a renamed test would
otherwise drop silently to the end of the queue and lengthen the whole run."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _dealing_order() -> tuple[str, ...]:
    """DEALING_ORDER as tests/conftest.py writes it (read, not imported: several conftest
    modules share that name)."""
    tree = ast.parse((REPO / "tests" / "conftest.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "DEALING_ORDER":
            return ast.literal_eval(node.value)
    raise AssertionError("tests/conftest.py has no DEALING_ORDER")


def test_every_entry_names_an_existing_module_or_test():
    order = _dealing_order()
    assert order
    for entry in order:
        module, _, test = entry.partition("::")
        path = REPO / module
        assert path.is_file(), entry
        if test:
            assert f"def {test}" in path.read_text(), entry
