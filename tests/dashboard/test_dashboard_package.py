"""The page and its vendored plotting library ship in the wheel (nothing comes from a CDN)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

from dash_helpers import REPO

STATIC = ("aggregator/dashboard/static/index.html", "aggregator/dashboard/static/dashboard.js",
          "aggregator/dashboard/static/dashboard.css",
          "aggregator/dashboard/static/vendor/uPlot.iife.min.js",
          "aggregator/dashboard/static/vendor/uPlot.min.css",
          "aggregator/dashboard/static/vendor/uPlot.LICENSE")


def test_wheel_holds_the_page_the_plotting_library_and_its_licence(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
        "demo-run", "test-artifacts", ".cache", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("fed_unimiss-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [f for f in STATIC if f not in names] == []


def test_page_loads_nothing_from_another_origin():
    static = REPO / "aggregator" / "dashboard" / "static"
    for path in (static / "index.html", static / "dashboard.js", static / "dashboard.css"):
        text = path.read_text()
        assert not re.search(r"(?:src|href)\s*=\s*[\"'](?:https?:)?//", text), path
        assert not re.search(r"fetch\([\"'](?:https?:)?//", text), path
        assert "@import" not in text, path
