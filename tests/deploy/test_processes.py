"""Process hygiene: children in their own sessions, orphans found and ended, PIDs recorded."""

from __future__ import annotations

import json
import sys
import time

from fed_unimiss.processes import alive, session_members
from flower_layer.processes import ProcessSet, kill_recorded

# A parent that starts a detached grandchild (like flower-superlink starting flower-superexec with
# start_new_session) which in turn starts a great-grandchild, then the middle one exits so that
# the great-grandchild is orphaned in the detached session, as Flower's flwr-serverapp is.
SPAWNER = r"""
import os, subprocess, sys, time
mid = subprocess.Popen([sys.executable, "-c", '''
import subprocess, sys, time
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(p.pid, flush=True)
time.sleep(float(sys.argv[1]))
''', sys.argv[1]], start_new_session=True, stdout=subprocess.PIPE, text=True)
orphan = int(mid.stdout.readline())
print(os.getpid(), mid.pid, orphan, flush=True)
time.sleep(600)
"""


def _wait_for_line(path, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.strip():
            return text.split()
        time.sleep(0.05)
    raise AssertionError(f"no output in {path}")


def test_close_ends_detached_sessions_and_their_orphans(tmp_path):
    with ProcessSet(tmp_path / "pids") as procs:
        procs.start("spawner", [sys.executable, "-c", SPAWNER, "1.0"], tmp_path / "spawner.log")
        parent, mid, orphan = map(int, _wait_for_line(tmp_path / "spawner.log"))
        procs.watch()  # remember the detached session while its leader is alive
        rec = json.loads((tmp_path / "pids" / "spawner.pid").read_text())
        assert rec["pid"] == parent and mid in rec["sessions"]
        deadline = time.monotonic() + 10
        while alive(mid) and time.monotonic() < deadline:  # the middle process exits ...
            time.sleep(0.05)
        assert not alive(mid)
        assert alive(orphan)  # ... leaving an orphan that no parent link leads to
    assert not alive(parent)
    assert not alive(orphan)
    assert session_members(mid) == []
    assert not (tmp_path / "pids" / "spawner.pid").exists()


def test_sigterm_handler_unwinds_through_close(tmp_path):
    import os
    import signal

    procs = ProcessSet(tmp_path / "pids")
    try:
        with procs:
            child = procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"],
                                tmp_path / "s.log")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises SystemExit before this ends
        raise AssertionError("SIGTERM did not interrupt")
    except SystemExit as e:
        assert e.code == 128 + signal.SIGTERM
    assert not alive(child.pid)


def test_kill_recorded_stops_leftovers_of_a_crashed_command(tmp_path):
    procs = ProcessSet(tmp_path / "pids")
    child = procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"],
                        tmp_path / "s.log")
    # the "crashed" command never calls close(); a later start finds the record
    hit = kill_recorded(tmp_path / "pids")
    assert child.pid in hit
    child.wait(timeout=10)
    assert not alive(child.pid)
    assert not list((tmp_path / "pids").glob("*.pid"))


def test_kill_recorded_ignores_reused_pids(tmp_path):
    (tmp_path / "pids").mkdir()
    # our own PID, recorded under another executable's name: must not be touched
    import os

    (tmp_path / "pids" / "x.pid").write_text(json.dumps(
        {"pid": os.getpid(), "cmd": ["/nonexistent/flower-superlink"], "sessions": []}))
    assert kill_recorded(tmp_path / "pids") == []
