"""What `aggregator status` and a round's line say about sites and stops, from RUN's records.

The records are the files `aggregator start` writes (aggregator.json, sites-online.json,
rounds.jsonl), written here by hand so that each case is exact; tests/deploy/test_coordinator_
edges.py has the real command write them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from aggregator.cli import format_round
from aggregator.run_status import process_record
from aggregator.run_summary import ONLINE_FILE, STATE_FILE, run_summary
from fed_unimiss.cli.main import main


def _dead_process() -> dict:
    """The record of a process that has ended (its pid is free again)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return {"pid": proc.pid, "pid_started": 0.0, "host": socket.gethostname()}


def _write(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj))


def test_round_line_names_the_absent_registered_sites():
    row = {"round": 1, "sites": ["A", "B"], "loss": 2.0, "seconds": 110.0,
           "rejected": {"C": "refused (code 5104)"}, "absent": ["D", "E"]}
    line = format_round(row, 20)
    assert line.startswith("round 1/20: 2 site(s) replied (A, B), loss 2.0000")
    assert line.endswith("; not used: C (refused (code 5104)); absent: D, E (registered, no reply)")
    assert "absent" not in format_round({**row, "absent": []}, 20)


def test_status_shows_who_is_online_while_no_round_has_completed(tmp_path, capsys):
    run = tmp_path / "RUN"
    run.mkdir()
    _write(run / STATE_FILE, {"status": "waiting", "run_id": None, "rounds": 3,
                              **process_record()})
    _write(run / ONLINE_FILE, {"at": 1.0, "registered": ["A", "B", "C"], "online": ["A", "C"],
                               **process_record()})
    assert main(["aggregator", "status", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "none yet" not in out
    assert "sites:       none in a completed round yet" in out
    assert "online now:  A, C: 2 of 3 registered (A, B, C); SuperLink asked" in out
    assert "state:       waiting (the aggregator waits for sites" in out
    assert main(["aggregator", "status", "--out", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sites_online"]["online"] == ["A", "C"]
    assert summary["sites_online"]["registered"] == ["A", "B", "C"]


def test_status_does_not_claim_sites_online_once_the_aggregator_has_ended(tmp_path, capsys):
    run = tmp_path / "RUN"
    run.mkdir()
    _write(run / ONLINE_FILE, {"at": 1.0, "registered": ["A", "B"], "online": ["B"],
                               **_dead_process()})
    _write(run / STATE_FILE, {"status": "waiting", "run_id": None, "rounds": 3,
                              **_dead_process()})
    summary = run_summary(run)
    assert summary["sites_online"]["online"] is None
    assert summary["sites_online"]["last_online"] == ["B"]
    assert summary["state"] == "failed" and "before the run was submitted" in summary["why"]
    assert main(["aggregator", "status", "--out", str(run)]) == 0
    assert "online now:  unknown: the aggregator is not running (last seen online: B)" in \
        capsys.readouterr().out


def test_a_stop_by_signal_reads_stopped_with_the_command_that_resumes(tmp_path, capsys):
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "rounds.jsonl").write_text(json.dumps({"round": 1, "sites": ["A"], "loss": 1.0,
                                                  "absent": ["B"]}) + "\n")
    command = "fed-unimiss aggregator start --kit /k --config /c.yaml --rounds 3 --out /r"
    _write(run / STATE_FILE, {"status": "stopped", "stopped_by": "SIGTERM",
                              "run_id": 1263004151004305773, "rounds": 3,
                              "resume_command": command, **_dead_process()})
    assert main(["aggregator", "status", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"state:       stopped (by SIGTERM; resume with: {command})" in out
    assert "failed" not in out and "143" not in out
    assert "sites:       A in round 1; absent from it: B" in out
    assert main(["aggregator", "status", "--out", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run_id"] == "1263004151004305773"  # text: exact in any JSON reader
    assert summary["resume_command"] == command


def test_records_of_older_versions_read_as_stops_too(tmp_path):
    """Before stops were recorded as such, SIGTERM left `interrupted` with error "143"."""
    run = tmp_path / "RUN"
    run.mkdir()
    for error, cause in (("143", "SIGTERM"), ("130", "SIGINT"), ("", "Ctrl-C")):
        _write(run / STATE_FILE, {"status": "interrupted", "error": error, "rounds": 3})
        summary = run_summary(run)
        assert (summary["state"], summary["why"].split(";")[0]) == ("stopped", f"by {cause}")
    _write(run / STATE_FILE, {"status": "error", "error": "SuperLink exited", "rounds": 3})
    assert run_summary(run)["state"] == "failed"


def test_a_simulate_stopped_by_ctrl_c_says_to_resume_with_resume(tmp_path):
    run = tmp_path / "RUN"
    run.mkdir()
    _write(run / "status.json", {"state": "stopped", "stopped_by": "Ctrl-C", "rounds": 3,
                                 "pid": os.getpid(), "host": socket.gethostname()})
    summary = run_summary(run)
    assert summary["state"] == "stopped"
    assert summary["why"] == "by Ctrl-C; run the same `simulate` command with --resume to continue"


def test_wait_for_sites_timeout_names_the_sites_that_did_not_come():
    from aggregator.deploy.runner import wait_timeout_message

    text = wait_timeout_message({"A", "C"}, ["A", "B", "C", "D"], 4, 600.0)
    assert text == ("only 2 of 4 site(s) came online within 600 s; not online: B, D "
                    "(online: A, C)")
