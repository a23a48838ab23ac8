"""Child processes that never outlive us: own sessions, recorded PIDs, whole-tree termination.

Flower's executables spawn grandchildren (the SuperExec, then one ``flwr-serverapp`` per run or
one ``flwr-clientapp`` per message) and do not always reap them: a ``flwr-serverapp`` blocked on
"waiting for nodes" survives its SuperLink as an orphan (FLOWER-1.39.md section 4). Orphans are
re-parented to init, so walking parent links is not enough. Every child is therefore started in a
new session (``setsid``); its descendants inherit the session id unless they call setsid
themselves, so scanning every process for that session id finds orphans too. Descendants by
parent link are collected as well, for anything that did start its own session. The process
table is read with psutil; the session id with ``os.getsid``, which psutil does not expose.

PIDs are written to ``<pid_dir>/<name>.pid`` so that a later start of the same command (or a
person) can find and stop leftovers of a crashed one.

Shared by the coordinator's and the site's process handling (SuperLink, demo sites, the SuperNode
and its ``flwr-clientapp`` processes), which must not import each other.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import psutil

__all__ = [
    "ProcessSet",
    "tree_sessions",
    "session_members",
    "descendants",
    "terminate_pids",
    "kill_recorded",
    "alive",
]

log = logging.getLogger(__name__)


def _sid(pid: int) -> int | None:
    """Session id of ``pid``, or None when it is gone."""
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_members(sid: int) -> list[int]:
    """Every live process whose session id is ``sid`` (orphans included)."""
    return [p.pid for p in psutil.process_iter() if _sid(p.pid) == sid and alive(p.pid)]


def descendants(root: int) -> list[int]:
    """Live descendants of ``root`` by parent link (not including ``root``)."""
    try:
        return [p.pid for p in psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return []


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def _tree(roots: Iterable[int], sessions: Iterable[int] = ()) -> set[int]:
    """The roots, their descendants, and every member of their and their descendants' sessions.

    Flower starts its SuperExec with ``start_new_session``; the ``flwr-serverapp`` it spawns
    stays in the SuperExec's session after the SuperExec dies, so sessions seen earlier
    (``sessions``) are scanned too.
    """
    me, my_sid = os.getpid(), _sid(os.getpid())
    found: set[int] = set()
    sids = set(sessions)
    for root in roots:
        if alive(root):
            found.add(root)
        sids.add(root)  # our children lead their own session: sid == pid
        found.update(descendants(root))
    sids.update(s for s in (_sid(p) for p in list(found)) if s is not None)
    sids.discard(my_sid)  # never our own session (nor the caller's terminal session)
    for sid in sids:
        found.update(session_members(sid))
    found.discard(me)
    return found


def tree_sessions(roots: Iterable[int]) -> set[int]:
    """Session ids in use by the trees of ``roots`` now (remembered to find orphans later)."""
    my_sid = _sid(os.getpid())
    found = {s for s in (_sid(p) for p in _tree(roots)) if s is not None}
    found.discard(my_sid)
    return found


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(roots: list[int], sessions: list[int], seen: set[int], timeout: float) -> set[int]:
    """Wait until the trees are empty or ``timeout`` passes; returns what is still alive."""
    deadline = time.monotonic() + timeout
    while True:
        # re-scan: a dying parent may have spawned a child in the meantime
        left = _tree(roots, sessions) | {p for p in seen if alive(p)}
        seen |= left
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def terminate_pids(
    roots: Iterable[int], grace_s: float = 5.0, sessions: Iterable[int] = ()
) -> list[int]:
    """End the trees of ``roots`` (sessions and descendants included); returns what was hit.

    First only the roots get SIGTERM, so that a well-behaved child (our own ``site start``, the
    SuperLink) can shut its own children down in order; whatever remains after ``grace_s`` gets
    SIGTERM, and after another ``grace_s`` SIGKILL. Safe for PIDs that already exited.
    """
    roots, sessions = list(roots), list(sessions)
    seen = _tree(roots, sessions)
    _signal_all([r for r in roots if alive(r)], signal.SIGTERM)
    left = _wait_gone(roots, sessions, seen, grace_s)
    if left:
        _signal_all(left, signal.SIGTERM)
        left = _wait_gone(roots, sessions, seen, grace_s)
    if left:
        _signal_all(left, signal.SIGKILL)
        _wait_gone(roots, sessions, seen, 2.0)
        log.warning("force-killed %d process(es) that ignored SIGTERM: %s", len(left),
                    sorted(left))
    return sorted(seen)


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
        for sid in recorded_sessions:  # orphans of Flower's detached SuperExec
            if any("flwr" in _cmdline(p) or "flower" in _cmdline(p) for p in session_members(sid)):
                sessions.add(sid)
        if alive(pid) and Path(exe).name in _cmdline(pid):
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
