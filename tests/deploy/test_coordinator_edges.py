"""`aggregator start` stopped by SIGTERM, and giving up on `--wait-for-sites`: what RUN records
and what `aggregator status` then says. A real SuperLink over TLS on 127.0.0.1, no site (none
is needed for either), the command run as a coordinator would.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import fu, json_of, wait_for

from aggregator.dashboard.data import run_view
from aggregator.demo import write_federation_yaml
from aggregator.provision import provision
from flower_layer.processes import ProcessSet
from site_client.supernode import free_port

pytestmark = pytest.mark.slow






def _start_cmd(tmp_path: Path, kit: Path, *extra: str) -> list[str]:
    config = write_federation_yaml(tmp_path / "fed.yaml", min_sites=2, round_timeout=600.0,
                                   local_steps=1)
    return fu("aggregator", "start", "--kit", str(kit), "--config", str(config), "--rounds", "3",
              "--out", str(tmp_path / "RUN"), "--address", f"127.0.0.1:{free_port()}",
              "--control-address", f"127.0.0.1:{free_port()}", *extra)


def test_sigterm_is_recorded_as_a_stop_and_status_says_how_to_resume(tmp_path):
    kits = provision(["A", "B"], tmp_path / "KITS", server_names=["127.0.0.1"])
    run, log = tmp_path / "RUN", tmp_path / "aggregator.log"
    cmd = _start_cmd(tmp_path, kits.coordinator)
    with ProcessSet(tmp_path / "pids") as procs:
        agg = procs.start("aggregator", cmd, log)
        # submitted, and the ServerApp is up (waiting for its min_sites): a run in progress
        wait_for(lambda: json_of(run / "aggregator.json").get("status") == "started"
                  and json_of(run / "status.json").get("state") == "running"
                  or agg.poll() is not None, 300, "the run to start")
        assert agg.poll() is None, log.read_text()[-3000:]
        waiting = subprocess.run(fu("aggregator", "status", "--out", str(run)),
                                 capture_output=True, text=True, timeout=120)
        agg.send_signal(signal.SIGTERM)
        code = agg.wait(timeout=120)
    assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
    # while it ran: nobody online yet, and status said so from the SuperLink's list
    assert "online now:  none: 0 of 2 registered (A, B)" in waiting.stdout, waiting.stdout
    assert "state:       running" in waiting.stdout

    status = subprocess.run(fu("aggregator", "status", "--out", str(run)), capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    state_line = next(ln for ln in status.stdout.splitlines() if "state:" in ln)
    assert state_line.startswith("  state:       stopped (by SIGTERM; resume with: "
                                 "fed-unimiss aggregator start --kit "), state_line
    assert f"--rounds 3 --out {run.resolve()}" in state_line and "failed" not in state_line
    assert "online now:  unknown: the aggregator is not running" in status.stdout
    recorded = json_of(run / "aggregator.json")
    assert recorded["status"] == "stopped" and recorded["stopped_by"] == "SIGTERM"
    as_json = json.loads(subprocess.run(fu("aggregator", "status", "--out", str(run), "--json"),
                                        capture_output=True, text=True, timeout=120).stdout)
    assert as_json["run_id"] == str(recorded["run_id"])
    # the dashboard: the same state, its reason without any path, the id as text
    view = run_view(run)
    assert view.run["state"] == "stopped" and view.run["run_id"] == str(recorded["run_id"])
    assert view.run["why"].startswith("by SIGTERM; run the same `aggregator start` command")
    assert "/" not in view.run["why"]


def test_wait_for_sites_timeout_names_the_sites_that_did_not_come(tmp_path):
    kits = provision(["A", "B", "C"], tmp_path / "KITS", server_names=["127.0.0.1"])
    proc = subprocess.run(_start_cmd(tmp_path, kits.coordinator, "--wait-for-sites", "2",
                                     "--wait-timeout", "3"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "waiting for sites: 0 of 2 online (none yet)" in proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: only 0 of 2 site(s) came online within 3 s; not online: A, B, C "
                      "(online: none)"], proc.stderr[-3000:]
