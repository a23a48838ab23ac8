"""Code, configs and build files say why, not which ticket asked for a change.

A comment such as "(issue 15)" points at a tracker this repository does not ship, so a reader
cannot follow it; the history of a change belongs in git log and in docs/. This test names every
file:line of the repository's Python, YAML, TOML and Makefiles that still refers to one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HISTORY = re.compile(r"\b[Ii]ssues? #?\d+")
SUFFIXES = (".py", ".yaml", ".yml", ".toml")
# Not code: docs/ may tell the project's history; the rest is installed, cached or generated.
SKIP_DIRS = {".git", ".venv", "venv", "docs", "__pycache__", ".ruff_cache", ".pytest_cache",
             "node_modules", "build", "dist"}


def _scanned_files() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(root) / f for f in files if f.endswith(SUFFIXES) or f == "Makefile"]
    return sorted(found)


def _history_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    rel = path.relative_to(REPO).as_posix()
    return [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), start=1)
            if HISTORY.search(line)]


def test_the_scan_sees_code_configs_and_the_makefile():
    rel = {p.relative_to(REPO).as_posix() for p in _scanned_files()}
    assert {"Makefile", "pyproject.toml", "fed_unimiss/ssl/engine.py"} <= rel
    assert any(r.startswith("configs/") and r.endswith(".yaml") for r in rel)
    assert not any(r.startswith(("docs/", ".venv/")) for r in rel)


def test_no_code_config_or_build_file_refers_to_an_issue_number():
    this = Path(__file__).resolve()  # it spells out examples of the pattern
    hits = [hit for path in _scanned_files()
            if path.resolve() != this
            for hit in _history_lines(path)]
    assert not hits, ("say why instead of naming an issue (history belongs in git log and "
                      "docs/):\n" + "\n".join(hits))


def test_the_pattern_finds_the_forms_it_is_meant_to():
    for text in ("# issue 7: dp", "(issues 6, 15)", "Issue #12", "see issue 19."):
        assert HISTORY.search(text), text
    for text in ("issue-free walk", "the issue's case", "tissue 3", "issued by the CA"):
        assert not HISTORY.search(text), text
