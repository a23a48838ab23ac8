"""The children of one command that runs Flower's executables; none outlives the command.

Flower's executables spawn grandchildren (the SuperExec, then one ``flwr-serverapp`` per run or
one ``flwr-clientapp`` per message) and do not always reap them: a ``flwr-serverapp`` blocked on
"waiting for nodes" survives its SuperLink as an orphan (docs/flower.md, "Processes"). Flower
also starts its SuperExec in a session of its own, and the ``flwr-serverapp`` it spawns stays in
that session after the SuperExec dies, so the sessions a child's tree uses are remembered while
it runs (:meth:`ProcessSet.watch`) and scanned when it ends. Tree termination itself is generic
(``fed_unimiss/processes.py``).

PIDs and sessions are written to ``<pid_dir>/<name>.pid`` so that a later start of the same
command (or a person) can find and stop leftovers of a crashed one (:func:`kill_recorded`).

Used by the coordinator (SuperLink, demo sites) and by tests and benchmarks that start
deployments.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from fed_unimiss.processes import (
    alive,
    command_line,
    session_members,
    terminate_pids,
    tree_sessions,
)

__all__ = ["ProcessSet", "kill_recorded"]

log = logging.getLogger(__name__)


def _flower_session(sid: int) -> bool:
    """True when a Flower process lives in session ``sid`` (session ids are PIDs, and reused)."""
    return any("flwr" in command_line(p) or "flower" in command_line(p)
               for p in session_members(sid))


def kill_recorded(pid_dir: Path) -> list[int]:
    """Stop the trees recorded in ``pid_dir`` by a previous (crashed) run; returns what was hit.

    A recorded PID is only trusted when its command line still matches the record, since PIDs are
    reused by the kernel.
    """
    roots: list[int] = []
    sessions: set[int] = set()
    for f in sorted(Path(pid_dir).glob("*.pid")):
        try:
            rec = json.loads(f.read_text())
            pid, exe = int(rec["pid"]), str(rec["cmd"][0])
            recorded_sessions = [int(x) for x in rec.get("sessions", [])]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
        # orphans of Flower's detached SuperExec
        sessions.update(sid for sid in recorded_sessions if _flower_session(sid))
        if alive(pid) and Path(exe).name in command_line(pid):
            roots.append(pid)
        f.unlink(missing_ok=True)
    return terminate_pids(roots, sessions=sessions) if roots or sessions else []


class ProcessSet:
    """The children of one command; ``close()`` (or leaving the ``with``) ends all their trees.

    SIGTERM and SIGHUP are turned into ``SystemExit`` while the set is open, so a ``kill`` of the
    command unwinds through ``close()`` just as Ctrl-C (KeyboardInterrupt) does.
    """

    def __init__(self, pid_dir: str | Path | None = None) -> None:
        self.pid_dir = Path(pid_dir) if pid_dir is not None else None
        self.children: dict[str, subprocess.Popen] = {}
        self.sessions: dict[str, set[int]] = {}
        self._cmds: dict[str, list[str]] = {}
        self._logs: dict[str, str] = {}
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> ProcessSet:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: the caller handles signals
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    @staticmethod
    def _on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: str | Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen:
        """Start ``cmd`` in its own session with stdout+stderr appended to ``log_path``."""
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            )
        self.children[name] = proc
        self.sessions[name] = {proc.pid}
        self._cmds[name], self._logs[name] = list(cmd), str(log_path)
        self._record(name)
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    def _record(self, name: str) -> None:
        if self.pid_dir is None:
            return
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        (self.pid_dir / f"{name}.pid").write_text(json.dumps({
            "pid": self.children[name].pid, "cmd": self._cmds[name], "log": self._logs[name],
            "sessions": sorted(self.sessions[name]),
        }))

    def watch(self) -> None:
        """Remember the sessions the children's trees use now (call it periodically).

        Needed because Flower detaches its SuperExec into a new session: once that SuperExec
        is gone, only its remembered session id leads to the ``flwr-serverapp`` it left behind.
        """
        for name, proc in self.children.items():
            new = tree_sessions([proc.pid]) - self.sessions[name]
            if new:
                self.sessions[name] |= new
                self._record(name)

    def stop(self, name: str, grace_s: float = 5.0) -> None:
        """End one child's whole tree (used to simulate or handle a crashed party)."""
        self.watch()
        proc = self.children.pop(name, None)
        if proc is None:
            return
        terminate_pids([proc.pid], grace_s, self.sessions.pop(name, set()))
        self._reap(name, proc, grace_s)

    def pids(self) -> list[int]:
        return [p.pid for p in self.children.values()]

    def close(self, grace_s: float = 5.0) -> None:
        """Terminate every child tree, orphans included; idempotent."""
        self.watch()
        roots = self.pids()
        sessions = set().union(*self.sessions.values()) if self.sessions else set()
        if roots:
            terminate_pids(roots, grace_s, sessions)
        self.sessions.clear()
        for name, proc in list(self.children.items()):
            self._reap(name, proc, grace_s)
        self.children.clear()

    def _reap(self, name: str, proc: subprocess.Popen, grace_s: float) -> None:
        """Collect an ended child's exit status and forget its PID record."""
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        if self.pid_dir is not None:
            (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)
