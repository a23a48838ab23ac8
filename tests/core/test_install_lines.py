"""Which torch a fed-unimiss install gets: the range pyproject declares, the pin that the
Makefile and every install line of the docs put in before the package, and the torch this venv
runs. pip does not choose a CPU build by itself: a doc line that installs the package with no
torch line before it sends a hospital's CPU server to PyPI's multi-GB CUDA build.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PIP_INSTALL = re.compile(r"pip install ([^`\n]+)")
TORCH_PIN = re.compile(r"torch==([0-9][\w.+]*)")


def _torch_range() -> SpecifierSet:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "torch"]
    assert len(torch) == 1, project["dependencies"]
    return torch[0].specifier


def test_declared_range_is_the_tested_torch_line_only():
    spec = _torch_range()
    assert spec.contains("2.13.0") and spec.contains("2.13.1")
    assert spec.contains(Version("2.13.0+cpu"))  # the CPU build's local version label
    # never tested: older lines, and the newer ones pip would otherwise take (with CUDA wheels)
    for untested in ("2.3.0", "2.12.1", "2.14.0", "2.14.1", "2.15.0"):
        assert not spec.contains(untested), untested


def test_the_torch_this_venv_runs_is_in_the_declared_range():
    assert _torch_range().contains(Version(version("torch")))


def test_the_makefile_pins_torch_inside_the_range():
    pins = TORCH_PIN.findall((REPO / "Makefile").read_text())
    assert pins, "the Makefile no longer puts torch in first"
    assert all(_torch_range().contains(p) for p in pins), pins


def _install_lines(doc: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1).strip()) for n, line in enumerate(doc.read_text().splitlines(), 1)
            for m in PIP_INSTALL.finditer(line)]


def test_every_install_line_in_the_docs_puts_a_supported_torch_in_first():
    spec = _torch_range()
    checked = 0
    for doc in DOCS:
        torch_first = False
        for n, args in _install_lines(doc):
            where = f"{doc.relative_to(REPO)}:{n}: pip install {args}"
            if args.startswith("torch"):
                pin = TORCH_PIN.match(args)
                assert pin and spec.contains(pin.group(1)), f"{where}: not a pin in {spec}"
                torch_first = True
            elif args.startswith("-e") or "fed-unimiss" in args:
                assert torch_first, f"{where}: the package before any torch line"
                checked += 1
        text = doc.read_text()
        if any(a.startswith("torch") and "whl/cpu" not in a for _, a in _install_lines(doc)):
            assert "CUDA" in text, f"{doc}: a torch line without the CPU index, and no word " \
                                   "of the CUDA build it pulls"
    assert checked >= 3  # README, the site and the coordinator guides


def test_the_guides_install_the_cpu_build_by_default():
    for name in ("README.md", "docs/site-guide.md", "docs/coordinator-guide.md"):
        lines = [a for _, a in _install_lines(REPO / name) if a.startswith("torch")]
        assert any("--index-url https://download.pytorch.org/whl/cpu" in a for a in lines), name


@pytest.mark.slow
def test_pip_resolves_the_package_alone_to_the_supported_torch(tmp_path):
    """As if nothing were installed (the site guide's line without torch first): pip picks a
    torch in the range, never a newer line."""
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                          "--ignore-installed", "--report", str(report), str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    assert _torch_range().contains(Version(chosen["torch"])), chosen["torch"]
