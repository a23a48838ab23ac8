"""A site started once takes part in run after run, as hospital IT runs it (issue-free walk of
docs/site-guide.md, "Start"): real SuperLink, SuperNode, TLS and site key on 127.0.0.1.

The site starts before any coordinator (it says so and waits), joins run 1, outlives the end of
that run (it says the run ended and that it waits for the next), joins run 2 when the
coordinator starts it, and exits 0 on SIGTERM. Nothing but the operator's stop ends it.

Run 3 is the rejected site: one round under a ``max_update_norm`` no honest update can meet, so
the round has 0 valid replies and stops the run. The site's terminal must say that its round-1
update was rejected and why (the run's last message, type ``query``), and the coordinator's
terminal must give the reason in a line, without a ServerApp traceback. It runs on the same
site process as runs 1 and 2 (one deployment instead of two).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from deploy_helpers import fu, set_site_yaml, text_of, wait_for

from aggregator.demo import write_federation_yaml
from aggregator.deploy.runner import read_rounds
from aggregator.provision import provision
from flower_layer.processes import ProcessSet
from site_client.supernode import free_port

pytestmark = pytest.mark.slow


def test_a_site_outlives_the_run_joins_the_next_and_hears_why_it_was_rejected(tmp_path):
    from fed_unimiss.data.phantom import write_phantoms

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kits = provision(["A"], tmp_path / "KITS", server_names=["127.0.0.1"])
    set_site_yaml(kits.sites["A"], reconnect_grace_s=3)
    write_phantoms(tmp_path / "data", 0, 2, seed=7)
    config = write_federation_yaml(tmp_path / "fed.yaml", min_sites=1, round_timeout=150.0,
                                   local_steps=1)
    rejecting = tmp_path / "fed-rejecting.yaml"
    rejecting.write_text(config.read_text() + "\nmax_update_norm: 1.0e-9\n")
    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    def aggregator(out: str, config: Path = config) -> list[str]:
        return [*fu(), "aggregator", "start",
                "--kit", str(kits.coordinator), "--config", str(config), "--rounds", "1",
                "--out", str(tmp_path / out), "--address", fleet, "--control-address", control,
                "--wait-for-sites", "1", "--wait-timeout", "300"]

    site_log, logs = tmp_path / "logs" / "site-A.log", tmp_path / "logs"
    with ProcessSet(tmp_path / "pids") as procs:
        site = procs.start("site-A", [*fu(), "site", "start",
                                      "--kit", str(kits.sites["A"]), "--data",
                                      str(tmp_path / "data"), "--superlink", fleet,
                                      "--state-dir", str(tmp_path / "state")],
                           site_log, env=env)
        # no coordinator yet: the site says why it cannot connect, and waits
        wait_for(lambda: "trying again in" in text_of(site_log) or site.poll() is not None, 120,
                  "the site's first retry line")
        first = procs.start("run-1", aggregator("RUN1"), logs / "run-1.log", env=env)
        wait_for(lambda: first.poll() is not None, 600, "run 1 to finish")
        wait_for(lambda: "has gone: its run ended" in text_of(site_log)
                  or site.poll() is not None, 180, "the site to notice the end of run 1")
        alive_between_runs = site.poll() is None
        second = procs.start("run-2", aggregator("RUN2"), logs / "run-2.log", env=env)
        wait_for(lambda: second.poll() is not None, 600, "run 2 to finish")
        alive_after = site.poll() is None
        wait_for(lambda: text_of(site_log).count("has gone: its run ended") >= 2
                  or site.poll() is not None, 180, "the site to notice the end of run 2")
        third = procs.start("run-3", aggregator("RUN3", rejecting), logs / "run-3.log", env=env)
        wait_for(lambda: third.poll() is not None, 600, "run 3 to end")
        wait_for(lambda: "REJECTED by the coordinator" in text_of(site_log), 30,
                  "the site's rejection line")
        site.send_signal(signal.SIGTERM)
        code = site.wait(timeout=60)

    text = text_of(site_log)
    assert "cannot reach the coordinator at" in text and "connection refused" in text, text
    assert first.returncode == 0, text_of(logs / "run-1.log")[-3000:]
    assert alive_between_runs, text[-3000:]
    assert "Waiting for the next run" in text
    assert second.returncode == 0, text_of(logs / "run-2.log")[-3000:]
    assert alive_after, text[-3000:]
    assert text.count(f"site A: connected to the coordinator at {fleet}") == 3, text[-3000:]
    assert text.count("site A: round 1: trained") == 3  # one round in each run
    for run in ("RUN1", "RUN2"):
        assert "A" in read_rounds(tmp_path / run)[0]["sites"], read_rounds(tmp_path / run)
    assert code == 0, text[-3000:]
    assert "stopping (signal)" in text

    # run 3: the rejected update, as the coordinator and the site tell it
    coordinator = text_of(logs / "run-3.log")
    assert third.returncode == 1, coordinator[-3000:]
    assert "0 valid replie(s) from 1 site(s)" in coordinator
    assert "Rejected replies: A: " in coordinator and "exceeds max_update_norm" in coordinator
    assert "Traceback" not in coordinator, coordinator[-3000:]
    line = next(ln for ln in text.splitlines() if "REJECTED by the coordinator" in ln)
    assert line.startswith("site A: round 1: update REJECTED by the coordinator: "), line
    assert "update norm" in line and "exceeds max_update_norm 1e-09" in line
    # ... and in the site's own log (the ClientApp's output, in the SuperNode's log)
    assert "round 1: the coordinator REJECTED this site's update" in \
        text_of(tmp_path / "state" / "logs" / "supernode.log")
