"""Deployed over TLS: a site whose only update is rejected hears why; the coordinator gets one line.

One site, ``min_sites: 1``, one round, and a federation whose ``max_update_norm`` no honest
update can meet: the round has 0 valid replies and stops the run. Through the real SuperLink,
SuperNode, warm worker and ClientApp processes (``aggregator start`` and ``site start``, as the
guides run them), the site's terminal must say that its round-1 update was rejected and why (the
run's last message, type ``query``), and the coordinator's terminal must give the reason in a
line, without a ServerApp traceback.
"""

from __future__ import annotations

import os
import signal

import pytest
from deploy_helpers import fu, text_of, wait_for

from aggregator.demo import write_federation_yaml
from aggregator.provision import provision
from flower_layer.processes import ProcessSet
from site_client.supernode import free_port

pytestmark = pytest.mark.slow





def test_rejected_site_hears_why_and_the_coordinator_gets_one_line(tmp_path):
    from fed_unimiss.data.phantom import write_phantoms

    kits = provision(["A"], tmp_path / "KITS", server_names=["127.0.0.1"])
    write_phantoms(tmp_path / "data", 0, 2, seed=7)
    config = write_federation_yaml(tmp_path / "fed.yaml", min_sites=1, round_timeout=150.0,
                                   local_steps=1)
    config.write_text(config.read_text() + "\nmax_update_norm: 1.0e-9\n")
    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "logs"
    with ProcessSet(tmp_path / "pids") as procs:
        agg = procs.start("aggregator", fu(
            "aggregator", "start", "--kit", str(kits.coordinator), "--config", str(config),
            "--rounds", "1", "--out", str(tmp_path / "RUN"), "--address", fleet,
            "--control-address", control, "--wait-for-sites", "1", "--wait-timeout", "300"),
            logs / "aggregator.log", env=env, cwd=tmp_path)
        site = procs.start("site-A", fu(
            "site", "start", "--kit", str(kits.sites["A"]), "--data", str(tmp_path / "data"),
            "--superlink", fleet, "--state-dir", str(tmp_path / "state-A")),
            logs / "site-A.log", env=env, cwd=tmp_path)
        wait_for(lambda: agg.poll() is not None, 600, "the run to end")
        wait_for(lambda: "REJECTED by the coordinator" in text_of(logs / "site-A.log"), 30,
                  "the site's rejection line")
        site.send_signal(signal.SIGTERM)
        site.wait(timeout=60)

    coordinator = text_of(logs / "aggregator.log")
    assert agg.returncode == 1, coordinator[-3000:]
    assert "0 valid replie(s) from 1 site(s)" in coordinator
    assert "Rejected replies: A: " in coordinator and "exceeds max_update_norm" in coordinator
    assert "Traceback" not in coordinator, coordinator[-3000:]
    site_a = text_of(logs / "site-A.log")
    assert "site A: round 1: trained" in site_a
    line = next(ln for ln in site_a.splitlines() if "REJECTED by the coordinator" in ln)
    assert line.startswith("site A: round 1: update REJECTED by the coordinator: "), line
    assert "update norm" in line and "exceeds max_update_norm 1e-09" in line
    # ... and in the site's own log (the ClientApp's output, in the SuperNode's log)
    assert "round 1: the coordinator REJECTED this site's update" in \
        text_of(tmp_path / "state-A" / "logs" / "supernode.log")
