"""``aggregator start --dashboard``: the page served beside a real federation over TLS.

A real SuperLink, two real SuperNodes on 127.0.0.1 (phantom X-ray sites), 2 rounds. While the
run goes on, the dashboard started by ``aggregator start`` answers with the run's state; when the
command has finished, ``aggregator dashboard`` over the same RUN reads it as finished.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from dash_helpers import http_get, serving

from aggregator.demo import write_federation_yaml
from aggregator.provision import provision
from fed_unimiss.processes import ProcessSet
from site_client.supernode import free_port

pytestmark = pytest.mark.slow

PY = sys.executable


def test_aggregator_start_serves_the_dashboard_beside_the_federation(tmp_path):
    from fed_unimiss.data.phantom import write_phantoms

    kits = provision(["A", "B"], tmp_path / "KITS", server_names=["127.0.0.1"])
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
                status, _, body = http_get(f"{base}/api/run")
            except OSError:  # not listening yet, or already stopped
                status = 0
            if status == 200:
                seen.append(json.loads(body))
            time.sleep(0.3)
        assert aggregator.wait(timeout=60) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    log = (tmp_path / "aggregator.log").read_text()
    assert f"dashboard of {run} on http://127.0.0.1:{port}/" in log
    running = [r for r in seen if r["state"] == "running"]
    assert running, seen[-3:]
    assert all(r["kind"] == "aggregator start" and r["rounds_target"] == 2 for r in running)
    assert any(r["rounds_done"] >= 1 and isinstance(r["run_id"], int) for r in running), seen
    with serving(run) as server:
        after = json.loads(http_get(f"http://127.0.0.1:{server.port}/api/run")[2])
        sites = json.loads(http_get(f"http://127.0.0.1:{server.port}/api/sites")[2])
    assert (after["state"], after["rounds_done"]) == ("finished", 2)
    assert [s["site"] for s in sites] == ["A", "B"]
    assert all(s["rounds_joined"] == 2 and s["samples_2d"] > 0 for s in sites)
