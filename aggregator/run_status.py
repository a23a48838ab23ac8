"""Whether a RUN is running, finished or failed, and why: one answer for ``status`` and the dashboard.

Two records may say it:

- ``RUN/status.json``, written by the ServerApp itself (``aggregator start`` and ``simulate``
  alike): ``running`` with its process id when the round loop starts, then ``finished`` or
  ``failed`` with the error. A process killed without a chance to write (SIGKILL, power loss)
  leaves ``running`` behind; its recorded process is then gone, and the run reads as failed.
- ``RUN/aggregator.json``, written by ``aggregator start`` (:mod:`aggregator.deploy.runner`):
  the Control API's final status of the run (``finished:completed``, ``finished:failed``...).

The reason shown is the aggregator's own message, cut to one line with file paths removed, so
it says no more than ``aggregator start`` printed: no path, no site text (the strategy never
records a site's error text, only its code).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["STATUS_FILE", "recorded_status", "read_json", "clean_text", "run_state"]

STATUS_FILE = "status.json"
AGGREGATOR_FILE = "aggregator.json"  # written by aggregator.deploy.runner (STATE_FILE there)

_PATHLIKE = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/:;,'\"()]+)+[\\/]?|~[\\/]\S*")


def clean_text(text: Any, limit: int = 240) -> str | None:
    """A one-line, path-free, bounded version of an aggregator message (None for no text)."""
    if not isinstance(text, str) or not text.strip():
        return None
    line = _PATHLIKE.sub("…", text.strip().splitlines()[0])
    return line[:limit] + ("…" if len(line) > limit else "")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when it is missing, torn or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


@contextmanager
def recorded_status(out: str | Path, rounds: int) -> Iterator[None]:
    """Record in ``out/status.json`` that this process runs the federation, then how it ended."""
    from fed_unimiss.checkpoint import atomic_write_json  # torch: not for `aggregator status`

    path = Path(out) / STATUS_FILE
    pid = os.getpid()
    base = {"rounds": int(rounds), "pid": pid, "pid_started": _process_start(pid),
            "host": socket.gethostname(), "started_at": time.time()}
    atomic_write_json(path, {**base, "state": "running"})
    try:
        yield
    except BaseException as e:
        state = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
        atomic_write_json(path, {**base, "state": state, "ended_at": time.time(),
                                 "error": f"{type(e).__name__}: {e}"})
        raise
    atomic_write_json(path, {**base, "state": "finished", "ended_at": time.time()})


def _gone(status: dict[str, Any]) -> bool:
    """True when the process recorded as running the federation no longer exists (this host)."""
    pid, started = status.get("pid"), status.get("pid_started")
    if status.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False  # another machine's process: cannot tell, trust the record
    now_started = _process_start(pid)
    if now_started is None:
        return True
    return isinstance(started, (int, float)) and abs(now_started - started) > 1.0  # pid reused


def run_state(out: str | Path, rounds_done: int, rounds_target: int | None
              ) -> tuple[str, str | None]:
    """(``running`` | ``finished`` | ``failed`` | ``waiting`` | ``unknown``, why or None)."""
    out = Path(out)
    status, deployed = read_json(out / STATUS_FILE), read_json(out / AGGREGATOR_FILE)
    label = deployed.get("status")
    if isinstance(label, str) and label != "started":  # aggregator start has the last word
        if label == "finished:completed":
            return "finished", None
        why = clean_text(deployed.get("error")) or clean_text(deployed.get("details"))
        return "failed", f"run {label}" + (f": {why}" if why else "")
    state = status.get("state")
    if state == "finished":
        return "finished", None
    if state in ("failed", "interrupted"):
        return "failed", f"{state}: {clean_text(status.get('error')) or 'no reason recorded'}"
    if state == "running":
        if _gone(status):
            return "failed", ("the process running the federation ended without recording an "
                              f"outcome (killed?) after {rounds_done} round(s)")
        return "running", None
    if label == "started":
        return "running", None
    if rounds_target and rounds_done >= rounds_target:
        return "finished", None
    if rounds_done == 0:
        return "waiting", "no round recorded yet"
    return "unknown", "this RUN has no status record (written by an older version)"
