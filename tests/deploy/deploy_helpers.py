"""Small helpers of the deployment tests: the CLI as a subprocess, waiting, reading logs."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

PY = sys.executable


def fu(*args: str) -> list[str]:
    """``fed-unimiss ARGS`` as this interpreter runs it (no console script needed)."""
    return [PY, "-m", "fed_unimiss.cli.main", *args]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.5 s; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def text_of(path: Path) -> str:
    """A log's text so far ('' before the process has written it)."""
    return path.read_text(errors="replace") if path.exists() else ""


def json_of(path: Path) -> dict:
    """A JSON record, or {} while it is missing or half written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def set_site_yaml(kit: Path, **values: object) -> None:
    """Rewrite top-level ``key: value`` lines of a kit's site.yaml (keys provision wrote).

    The tests shorten ``reconnect_grace_s``: a site notices a finished run after that many
    seconds instead of the production 30, which is all the deployment tests wait for.
    """
    path = kit / "site.yaml"
    text = path.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
        assert n == 1, f"{path}: no line {key!r} to set"
    path.write_text(text)
