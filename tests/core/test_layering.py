"""The science package never imports Flower; site and aggregator never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _offenders(package: str, forbidden: set[str], skip: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(skip):
            continue
        hit = _imports(path) & forbidden
        if hit:
            bad.append(f"{rel} imports {sorted(hit)}")
    return bad


def test_science_package_never_imports_flower_or_the_apps():
    # The CLI table names the app modules as strings and imports them lazily; nothing else may.
    assert _offenders("fed_unimiss", {"flwr", "site_client", "aggregator"}) == []


def test_site_and_aggregator_do_not_import_each_other():
    assert _offenders("site_client", {"aggregator"}) == []
    assert _offenders("aggregator", {"site_client"}, ) == []


def test_importing_the_science_package_does_not_load_flower():
    code = (
        "import importlib, pkgutil, sys, fed_unimiss\n"
        "for m in pkgutil.walk_packages(fed_unimiss.__path__, 'fed_unimiss.'):\n"
        "    if not m.name.startswith('fed_unimiss.cli'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k == 'flwr' or k.startswith('flwr.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
