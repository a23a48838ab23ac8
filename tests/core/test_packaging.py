"""The package as a user gets it: installed into a fresh venv from its declared dependencies only.

Every module of the four packages must import there (an undeclared dependency fails), and the
``fed-unimiss`` command must find every subcommand through its entry points. A fast static check
catches what the install would hide: a module imported directly but only installed because a
declared dependency pulls it in (``click`` through flwr, say).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("fed_unimiss", "site_client", "aggregator", "flower_layer")
COMMANDS = ("data", "pretrain", "export", "finetune", "probe", "simulate", "provision",
            "aggregator", "site", "demo")

IMPORT_ALL = f"""
import importlib, pkgutil
failed = []
for top in {PACKAGES!r}:
    package = importlib.import_module(top)
    for m in pkgutil.walk_packages(package.__path__, top + "."):
        try:
            importlib.import_module(m.name)
        except Exception as e:
            failed.append(f"{{m.name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed) or "ok")
"""


def _source_copy(dest: Path) -> Path:
    """The working tree's files without the venv, build leftovers and the real-sample cache (pip
    builds in the copy)."""
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", "demo-run", ".cache")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def _run(cmd: list[str], timeout: float = 600) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_clean_install_imports_every_module_and_finds_every_command(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    pip, python = str(venv / "bin" / "pip"), str(venv / "bin" / "python")
    # torch first, as the Makefile does: the CPU build this machine has, not a CUDA download.
    # --no-compile: byte-compiling all of torch and its neighbours is most of an install's CPU
    # time, and what is imported below compiles on import anyway.
    _run([pip, "install", "-q", "--no-compile", "torch==2.13.0"])
    _run([pip, "install", "-q", "--no-compile", str(_source_copy(tmp_path / "src"))])
    assert _run([python, "-c", IMPORT_ALL]).strip() == "ok"
    listing = _run([str(venv / "bin" / "fed-unimiss"), "--help"])
    missing = [c for c in COMMANDS if f"    {c} " not in listing]
    assert missing == [], listing


def _third_party_imports() -> set[str]:
    names: set[str] = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in PACKAGES}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_a_declared_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_normalise(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0])
                for d in project["dependencies"]}
    providers = packages_distributions()
    undeclared = {name: providers.get(name) for name in sorted(_third_party_imports())
                  if not {_normalise(d) for d in providers.get(name, [])} & declared}
    assert undeclared == {}
