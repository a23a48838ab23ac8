"""``aggregator start --dashboard``: the page served beside a real federation over TLS.

A real SuperLink, two real SuperNodes on 127.0.0.1 (phantom X-ray sites), 2 rounds; a third
site, C, is registered but never comes. While the run goes on, the dashboard started by
``aggregator start`` answers with the run's state and who is online (from the SuperLink), and so
does ``aggregator status``; every round names C absent, on the console and in rounds.jsonl. When
the command has finished, ``aggregator dashboard`` over the same RUN reads it as finished.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from dash_helpers import http_get, serving

from aggregator.demo import write_federation_yaml
from aggregator.deploy.runner import read_rounds
from aggregator.provision import provision
from flower_layer.processes import ProcessSet
from site_client.supernode import free_port

pytestmark = pytest.mark.slow

PY = sys.executable


def test_aggregator_start_serves_the_dashboard_beside_the_federation(tmp_path):
    from fed_unimiss.data.phantom import write_phantoms

    kits = provision(["A", "B", "C"], tmp_path / "KITS", server_names=["127.0.0.1"])
    data = tmp_path / "data"
    write_phantoms(data, 0, 2, seed=7)
    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    port = free_port()
    run = tmp_path / "RUN"
    config = write_federation_yaml(tmp_path / "fed.yaml", min_sites=2, round_timeout=150.0,
                                   local_steps=1)
    cmd = [PY, "-m", "fed_unimiss.cli.main", "aggregator", "start", "--kit",
           str(kits.coordinator), "--config", str(config), "--rounds", "2", "--out", str(run),
           "--address", fleet, "--control-address", control, "--wait-for-sites", "2",
           "--wait-timeout", "240", "--dashboard", f"127.0.0.1:{port}"]
    base = f"http://127.0.0.1:{port}"
    seen: list[dict] = []
    status = None
    with ProcessSet(tmp_path / "pids") as procs:
        aggregator = procs.start("aggregator", cmd, tmp_path / "aggregator.log")
        for s in ("A", "B"):
            procs.start(f"site-{s}", [PY, "-m", "fed_unimiss.cli.main", "site", "start",
                                      "--kit", str(kits.sites[s]), "--data", str(data),
                                      "--superlink", fleet, "--state-dir",
                                      str(tmp_path / "state" / s)], tmp_path / f"site-{s}.log")
        deadline = time.monotonic() + 400
        while aggregator.poll() is None and time.monotonic() < deadline:
            try:
                code, _, body = http_get(f"{base}/api/run")
            except OSError:  # not listening yet, or already stopped
                code = 0
            if code == 200:
                seen.append(json.loads(body))
            if status is None and seen and seen[-1]["sites_online"] == ["A", "B"]:
                status = subprocess.run([PY, "-m", "fed_unimiss.cli.main", "aggregator",
                                         "status", "--out", str(run)], capture_output=True,
                                        text=True, timeout=120)
            time.sleep(0.3)
        assert aggregator.wait(timeout=60) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    log = (tmp_path / "aggregator.log").read_text()
    assert f"dashboard of {run} on http://127.0.0.1:{port}/" in log
    running = [r for r in seen if r["state"] == "running"]
    assert running, seen[-3:]
    assert all(r["kind"] == "aggregator start" and r["rounds_target"] == 2 for r in running)
    # the run id as text, digit for digit what aggregator.json holds (JavaScript rounds numbers)
    run_id = json.loads((run / "aggregator.json").read_text())["run_id"]
    assert any(r["rounds_done"] >= 1 and r["run_id"] == str(run_id) for r in running), seen
    assert all(r["sites_registered"] == ["A", "B", "C"] for r in running)
    assert any(r["sites_online"] == ["A", "B"] for r in seen), seen[-3:]
    assert status is not None and status.returncode == 0, status
    assert "online now:  A, B: 2 of 3 registered (A, B, C)" in status.stdout, status.stdout
    # C never came: every round names it, on the console and in rounds.jsonl
    lines = [ln for ln in log.splitlines() if ln.startswith("round ")]
    assert len(lines) == 2 and all(ln.endswith("; absent: C (registered, no reply)")
                                   for ln in lines), lines
    assert [r["absent"] for r in read_rounds(run)] == [["C"], ["C"]]
    with serving(run) as server:
        after = json.loads(http_get(f"http://127.0.0.1:{server.port}/api/run")[2])
        sites = json.loads(http_get(f"http://127.0.0.1:{server.port}/api/sites")[2])
    assert (after["state"], after["rounds_done"]) == ("finished", 2)
    assert [s["site"] for s in sites] == ["A", "B", "C"]
    assert all(s["rounds_joined"] == 2 and s["samples_2d"] > 0 for s in sites[:2])
    assert sites[2]["rounds_joined"] == 0 and sites[2]["registered"]
    assert after["sites_online"] is None  # the SuperLink ended with the command: unknown
