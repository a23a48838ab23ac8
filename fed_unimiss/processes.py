"""Ending a child's whole process tree: descendants, orphans in its session, SIGTERM then SIGKILL.

A child's descendants are not always reaped by their parents; an orphan is re-parented to init,
so walking parent links alone misses it. Children started in a new session (``setsid``) pass
their session id on to every descendant that does not start its own session, so scanning every
process for that session id finds orphans too; descendants by parent link are collected as well,
for anything that did start its own session. The process table is read with psutil; the session
id with ``os.getsid``, which psutil does not expose.

Generic and free of Flower: the site's warm worker and the SuperNode wrapper end their trees with
:func:`terminate_pids`; the Flower-aware parts (the set of a command's children, PID records,
remembered sessions of Flower's detached SuperExec) are in ``flower_layer/processes.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable

import psutil

__all__ = [
    "alive",
    "command_line",
    "descendants",
    "session_members",
    "terminate_pids",
    "tree_sessions",
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


def command_line(pid: int) -> str:
    """The command line of ``pid`` joined by spaces; empty when it is gone or unreadable."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def _tree(roots: Iterable[int], sessions: Iterable[int] = ()) -> set[int]:
    """The roots, their descendants, and every member of their and their descendants' sessions.

    A descendant that started its own session can leave orphans in it after it died; sessions
    seen earlier (``sessions``) are scanned too, so those orphans are still found.
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
