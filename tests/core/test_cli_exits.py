"""The ``fed-unimiss`` entry point's shared rules: usage errors exit 2, a closed pipe is quiet.

Both go through the installed command in a subprocess, as a shell would run it: the exit code is
the process's, and the closed pipe is a real one whose reader is gone before the command writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fed_unimiss.cli.main import EXIT_BROKEN_PIPE, EXIT_USAGE

FED_UNIMISS = Path(sys.executable).with_name("fed-unimiss")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FED_UNIMISS), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("args", [
    ("--no-such-flag",),
    ("aggregator", "status", "--out", ".", "--no-such-flag"),
    ("aggregator", "start", "--kit", "K"),  # required flags missing
    ("provision", "--sites", "A", "--out", "K", "--fleet-port", "many"),
    ("no-such-command",),
    (),
])
def test_usage_errors_exit_2_with_the_usage_line(args):
    proc = _run(*args)
    assert proc.returncode == EXIT_USAGE == 2, proc.stderr
    assert "usage: fed-unimiss" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A RUN folder with enough rounds that `status` has a few lines to print."""
    run = tmp_path / "RUN"
    run.mkdir()
    rows = [{"round": n, "sites": ["A", "B"], "loss": 10.0 - n,
             "site_seconds": {"A": 1.0, "B": 2.0}, "bytes_up": {"A": 10, "B": 20},
             "bytes_down": {"A": 30, "B": 30}, "seconds": 3.0} for n in range(1, 40)]
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.mark.parametrize("extra", [(), ("--json",)])
def test_status_into_a_pipe_closed_early_ends_quietly(run_folder, extra):
    """`fed-unimiss aggregator status | head`, with `head` gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already exited: every write gets EPIPE
    try:
        proc = subprocess.run([str(FED_UNIMISS), "aggregator", "status", "--out",
                               str(run_folder), *extra], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == EXIT_BROKEN_PIPE, proc.stderr
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback, no "Exception ignored"


def test_status_into_a_pipe_that_stays_open_prints_everything(run_folder):
    proc = _run("aggregator", "status", "--out", str(run_folder))
    assert proc.returncode == 0, proc.stderr
    assert "rounds done: 39" in proc.stdout and "round 39:" in proc.stdout
