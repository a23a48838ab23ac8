"""The coordinator and site guides, walked command by command as a new user would.

Everything goes through the ``fed-unimiss`` command, on 127.0.0.1 with TLS and site keys:
provision with a public server name (which does not resolve here, so sites pass
``--superlink 127.0.0.1:PORT`` as the guides tell a single-machine tester), check the data and
the kit, start the aggregator with ``--wait-for-sites``, start three sites, one of them with the
site guide's DP flags against the non-DP micro federation. What a person would look for on each
terminal is asserted: sites-online progress, "connected", per-round lines on the sites and at
the coordinator (the DP site named with its reason's category, no private text), ``aggregator
status`` with the right sites, plain-text SuperNode logs, and the exported model. The resume
walk (kill -9, the same command again, another ``--rounds`` refused) is
tests/deploy/test_deploy_e2e.py; the researcher guide is tests/core/test_researcher_guide.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest
from deploy_helpers import fu, text_of, wait_for

from aggregator.demo import write_federation_yaml
from aggregator.deploy.runner import read_rounds
from flower_layer.processes import ProcessSet
from site_client.supernode import free_port

pytestmark = pytest.mark.slow






def test_guides_walk_dp_site_on_a_non_dp_federation(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run(fu(*a), capture_output=True, text=True, env=env,  # noqa: E731
                                    timeout=300, cwd=tmp_path)
    # coordinator guide, 2. Provision (a public name, as in the guide)
    out = run("provision", "--sites", "A,B,C", "--out", "KITS", "--server-name", "fl.example.org")
    assert out.returncode == 0, out.stderr
    assert "add sites later: fed-unimiss provision --add-sites" in out.stdout
    assert (tmp_path / "KITS" / "coordinator" / "federation.yaml").is_file()
    # site guide, 3-4. data, data check, check-only
    for i, site in enumerate("ABC"):
        assert run("data", "phantom", f"data-{site}", "--ct", "0", "--xray", "3",
                   "--seed", str(i)).returncode == 0
    check = run("data", "check", "data-A")
    assert check.returncode == 0 and "3 X-ray(s) usable" in check.stdout
    kit_check = run("site", "start", "--kit", "KITS/site-A", "--data", "data-A", "--check-only")
    assert kit_check.returncode == 0 and "data ok" in kit_check.stdout, kit_check.stderr

    # coordinator guide, 4. Start a run (the micro federation, cheaper: 2 local steps, no eval)
    config = write_federation_yaml(tmp_path / "fed.yaml", min_sites=2, round_timeout=240.0,
                                   local_steps=2)
    fleet_port, control = free_port(), f"127.0.0.1:{free_port()}"
    fleet = f"127.0.0.1:{fleet_port}"
    agg_cmd = fu("aggregator", "start", "--kit", "KITS/coordinator", "--config", str(config),
                 "--rounds", "2", "--out", "RUN", "--address", fleet,
                 "--control-address", control, "--wait-for-sites", "3", "--wait-timeout", "300")
    site_cmd = {s: fu("site", "start", "--kit", f"KITS/site-{s}", "--data", f"data-{s}",
                      "--superlink", fleet, "--state-dir", f"state-{s}") for s in "ABC"}
    site_cmd["A"] += ["--dp-epsilon", "8", "--dp-delta", "1e-5", "--dp-clip", "1.0",
                      "--dp-planned-rounds", "2", "--dp-patients-per-step", "2"]  # the guide's
    logs = tmp_path / "logs"
    with ProcessSet(tmp_path / "pids") as procs:
        agg = procs.start("aggregator", agg_cmd, logs / "aggregator.log", env=env, cwd=tmp_path)
        wait_for(lambda: "waiting for sites: 0 of 3" in text_of(logs / "aggregator.log")
                  or agg.poll() is not None, 120, "the sites-online line")
        # coordinator guide, 5. Watch: before any round, who is online now (nobody yet)
        waiting = run("aggregator", "status", "--out", "RUN")
        for s in "ABC":
            procs.start(f"site-{s}", site_cmd[s], logs / f"site-{s}.log", env=env, cwd=tmp_path)
        wait_for(lambda: agg.poll() is not None, 900, "the run to finish")
        status = run("aggregator", "status", "--out", "RUN")
        # coordinator guide, 7. Publish: export the last round for researchers
        export = run("export", "RUN/global_round_0002.safetensors", "--out", "model")
        for s in "ABC":  # the sites keep running until stopped, as the guide says
            procs.children[f"site-{s}"].send_signal(signal.SIGTERM)
        codes = {s: procs.children[f"site-{s}"].wait(timeout=60) for s in "ABC"}

    coordinator = text_of(logs / "aggregator.log")
    assert agg.returncode == 0, coordinator[-3000:]
    assert "waiting for sites: 0 of 3 online" in coordinator
    assert "3 site(s) online: A, B, C" in coordinator
    lines = [ln for ln in coordinator.splitlines() if ln.startswith("round ")]
    assert len(lines) == 2, coordinator
    for line in lines:  # B and C trained; A is named with its category and code
        assert "2 site(s) replied (B, C)" in line
        assert "not used: A (refused: the site's DP settings cannot train this federation's " \
               "recipe" in line and "code 5104" in line
        assert "head_weight_norm" not in line  # the site's own text stays at the site
    rows = read_rounds(tmp_path / "RUN")
    assert "code 5104" in rows[0]["rejected"]["A"]
    assert "head_weight_norm" not in json.dumps(rows)

    site_a = text_of(logs / "site-A.log")
    assert "site A: differential privacy on" in site_a
    assert "site A: connected to the coordinator at" in site_a
    assert "site A: round 1: REFUSED: differential privacy is on at this site" in site_a
    assert "head_weight_norm" in site_a  # the operator sees why, with the fix
    site_b = text_of(logs / "site-B.log")
    assert "site B: connected to the coordinator" in site_b
    assert "site B: round 1: trained (2 step(s)" in site_b and "site B: round 2: trained" in site_b
    assert codes == {"A": 0, "B": 0, "C": 0}
    for s in "ABC":  # plain text, no terminal colour codes
        assert "\x1b[" not in text_of(tmp_path / f"state-{s}" / "logs" / "supernode.log")

    assert export.returncode == 0, export.stderr
    assert (tmp_path / "model" / "config.json").is_file()
    assert waiting.returncode == 0, waiting.stderr
    assert "sites:       none in a completed round yet" in waiting.stdout, waiting.stdout
    assert "online now:  none: 0 of 3 registered (A, B, C)" in waiting.stdout
    assert "state:       waiting" in waiting.stdout
    assert status.returncode == 0, status.stderr
    assert "sites:       B, C in round 2" in status.stdout, status.stdout
    assert "online now:  unknown: the aggregator is not running (last seen online: A, B, C)" \
        in status.stdout, status.stdout
    assert "absent" not in coordinator  # every registered site came
    assert "A" not in status.stdout.split("sites:")[1].splitlines()[0]


def test_site_with_an_unresolvable_coordinator_name_says_why(tmp_path):
    """The kit as provisioned waits until stopped for a coordinator that is not up; a name that
    does not exist is certain, and ends the command before any SuperNode dials it."""
    from aggregator.provision import provision
    from fed_unimiss.data.phantom import write_phantoms

    kits = provision(["A"], tmp_path / "KITS", server_names=["fl.example.org"])
    kit = kits.sites["A"]
    assert "connect_timeout_s: 0\n" in (kit / "site.yaml").read_text()
    write_phantoms(tmp_path / "data", 0, 2, seed=3)
    out = subprocess.run(fu("site", "start", "--kit", str(kit), "--data", str(tmp_path / "data"),
                            "--superlink", "no-such-host.invalid:9092", "--state-dir",
                            str(tmp_path / "st")),
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 3, out.stderr
    assert "cannot reach the coordinator at no-such-host.invalid:9092" in out.stderr
    assert "cannot be resolved" in out.stderr, out.stderr  # the cause, on the terminal
    assert not (tmp_path / "st" / "logs" / "supernode.log").exists()
    shutil.rmtree(tmp_path / "st", ignore_errors=True)
