"""The science package never imports Flower; site and aggregator never import each other; only
flower_layer reaches into Flower beyond its public API, and it imports neither app."""

from __future__ import annotations

import ast
import re
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
    assert _offenders("fed_unimiss", {"flwr", "flower_layer", "site_client", "aggregator"}) == []


def test_flower_layer_imports_neither_app():
    assert _offenders("flower_layer", {"site_client", "aggregator"}) == []


# Flower 1.39's documented API for apps; everything else in flwr (flwr.cli, flwr.common,
# flwr.proto, flwr.supercore, flwr.superlink, flwr.supernode, ...) is an internal.
PUBLIC_FLOWER = {"flwr", "flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy",
                 "flwr.simulation"}


def _flwr_modules(path: Path) -> set[str]:
    """Full names of the flwr modules ``path`` imports (``from flwr import x`` counts as flwr.x)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "flwr":
                mods.update(f"flwr.{a.name}" for a in node.names)
            else:
                mods.add(node.module)
    return {m for m in mods if m == "flwr" or m.startswith("flwr.")}


def test_flower_internals_are_imported_only_by_the_flower_layer():
    bad = []
    for package in ("aggregator", "site_client", "fed_unimiss", "benchmarks"):
        for path in sorted((REPO / package).rglob("*.py")):
            private = sorted(_flwr_modules(path) - PUBLIC_FLOWER)
            if private:
                bad.append(f"{path.relative_to(REPO).as_posix()} imports {private}")
    assert bad == []


def test_the_layer_rule_sees_a_private_import():
    """The rule above is not vacuous: the layer itself does import Flower internals."""
    private = set().union(*(_flwr_modules(p) for p in (REPO / "flower_layer").glob("*.py")))
    assert any(m.startswith("flwr.supercore") for m in private - PUBLIC_FLOWER)


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


def test_importing_the_flower_layer_package_does_not_load_flower():
    code = (
        "import sys, flower_layer, flower_layer.processes\n"
        "print(sorted(k for k in sys.modules if k == 'flwr' or k.startswith('flwr.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# A module name, a path or a quoted name of either app package; "the aggregator" (the role)
# is allowed.
_APP_NAME = re.compile(r"site_client|\baggregator[./:]\w|[`'\"]aggregator[`'\"]")


def test_science_package_does_not_even_name_the_apps():
    bad = [f"{path.relative_to(REPO).as_posix()}:{n}: {line.strip()}"
           for path in sorted((REPO / "fed_unimiss").rglob("*.py"))
           for n, line in enumerate(path.read_text().splitlines(), start=1)
           if _APP_NAME.search(line)]
    assert bad == []


def test_privacy_is_a_leaf_under_ssl():
    """ssl builds its DP gradient step on privacy; privacy never imports ssl (no cycle)."""
    privacy = REPO / "fed_unimiss" / "privacy"
    assert not any(_imports_anywhere(p, "fed_unimiss.ssl") for p in privacy.rglob("*.py"))


def _imports_anywhere(path: Path, module: str) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith(module) for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(module):
            return True
    return False
