"""Whether a RUN is running, finished or failed, and why: one answer for ``status`` and the dashboard.

Two records may say it:

- ``RUN/status.json``, written by the ServerApp itself (``aggregator start`` and ``simulate``
  alike): ``running`` with its process id when the round loop starts, then ``finished`` or
  ``failed`` with the error. A process killed without a chance to write (SIGKILL, power loss)
  leaves ``running`` behind; its recorded process is then gone, and the run reads as failed.
- ``RUN/aggregator.json``, written by ``aggregator start`` (:mod:`aggregator.deploy.runner`):
  the Control API's final status of the run (``finished:completed``, ``finished:failed``...),
  or ``stopped`` with the signal when someone stopped the command (Ctrl-C, SIGTERM): a stop is
  not a failure, and the same command resumes.

The reason shown is the aggregator's own message, cut to one line with file paths removed, so
it says no more than ``aggregator start`` printed: no path, no site text (the strategy never
records a site's error text, only its code).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["STATUS_FILE", "recorded_status", "read_json", "clean_text", "run_state",
           "stop_cause", "process_record", "process_gone"]

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


def process_record() -> dict[str, Any]:
    """This process as a record that :func:`process_gone` can later check."""
    pid = os.getpid()
    return {"pid": pid, "pid_started": _process_start(pid), "host": socket.gethostname()}


def stop_cause(e: BaseException) -> str | None:
    """``Ctrl-C`` or the signal's name (``SIGTERM``) when ``e`` is how a stop arrives here;
    None for anything else (an error, or ``sys.exit`` with an ordinary code).

    Ctrl-C raises KeyboardInterrupt; SIGTERM and SIGHUP are turned into ``SystemExit(128 + N)``
    by :class:`flower_layer.processes.ProcessSet`.
    """
    if isinstance(e, KeyboardInterrupt):
        return "Ctrl-C"
    if isinstance(e, SystemExit) and isinstance(e.code, int) and e.code > 128:
        try:
            return signal.Signals(e.code - 128).name
        except ValueError:
            return None
    return None


@contextmanager
def recorded_status(out: str | Path, rounds: int) -> Iterator[None]:
    """Record in ``out/status.json`` that this process runs the federation, then how it ended."""
    from fed_unimiss.checkpoint import atomic_write_json  # torch: not for `aggregator status`

    path = Path(out) / STATUS_FILE
    base = {"rounds": int(rounds), **process_record(), "started_at": time.time()}
    atomic_write_json(path, {**base, "state": "running"})
    try:
        yield
    except BaseException as e:
        cause = stop_cause(e)
        if cause is not None:
            record = {"state": "stopped", "stopped_by": cause}
        else:
            record = {"state": "interrupted" if isinstance(e, SystemExit) else "failed",
                      "error": f"{type(e).__name__}: {e}"}
        atomic_write_json(path, {**base, **record, "ended_at": time.time()})
        raise
    atomic_write_json(path, {**base, "state": "finished", "ended_at": time.time()})


def process_gone(status: dict[str, Any]) -> bool:
    """True when the process of a :func:`process_record` no longer exists (this host only)."""
    pid, started = status.get("pid"), status.get("pid_started")
    if status.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False  # another machine's process: cannot tell, trust the record
    now_started = _process_start(pid)
    if now_started is None:
        return True
    return isinstance(started, (int, float)) and abs(now_started - started) > 1.0  # pid reused


_OLD_STOP = re.compile(r"^(?:SystemExit: )?(1[2-9]\d)$")  # "interrupted" records of older versions


def _recorded_stop(record: dict[str, Any], label: Any) -> str | None:
    """The Ctrl-C / signal that stopped the command of ``record``, or None if none did."""
    if label == "stopped":
        cause = record.get("stopped_by")
        return cause if isinstance(cause, str) and cause else "a signal"
    if label != "interrupted":
        return None
    error = str(record.get("error") or "").strip()
    if error in ("", "KeyboardInterrupt:", "KeyboardInterrupt"):
        return "Ctrl-C"
    match = _OLD_STOP.match(error)
    return stop_cause(SystemExit(int(match[1]))) if match else None


def _stopped_why(cause: str, deployed: bool) -> str:
    """Path-free (the dashboard shows it too); ``aggregator status`` adds the command itself."""
    if deployed:
        return f"by {cause}; run the same `aggregator start` command again to resume"
    return f"by {cause}; run the same `simulate` command with --resume to continue"


def run_state(out: str | Path, rounds_done: int, rounds_target: int | None
              ) -> tuple[str, str | None]:
    """(``running`` | ``finished`` | ``failed`` | ``stopped`` | ``waiting`` | ``unknown``,
    why or None)."""
    out = Path(out)
    status, deployed = read_json(out / STATUS_FILE), read_json(out / AGGREGATOR_FILE)
    label = deployed.get("status")
    if label == "waiting":  # aggregator start is up, the run not yet submitted
        if process_gone(deployed):
            return "failed", ("the aggregator ended without recording an outcome (killed?) "
                              "before the run was submitted")
        return "waiting", "the aggregator waits for sites before it submits the run"
    if isinstance(label, str) and label != "started":  # aggregator start has the last word
        if label == "finished:completed":
            return "finished", None
        cause = _recorded_stop(deployed, label)
        if cause is not None:
            return "stopped", _stopped_why(cause, deployed=True)
        why = clean_text(deployed.get("error")) or clean_text(deployed.get("details"))
        return "failed", f"run {label}" + (f": {why}" if why else "")
    state = status.get("state")
    if state == "finished":
        return "finished", None
    cause = _recorded_stop(status, state)
    if cause is not None:
        return "stopped", _stopped_why(cause, deployed=bool(deployed))
    if state in ("failed", "interrupted"):
        return "failed", f"{state}: {clean_text(status.get('error')) or 'no reason recorded'}"
    if state == "running":
        if process_gone(status):
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
