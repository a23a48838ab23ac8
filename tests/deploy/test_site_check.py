"""``fed-unimiss site check`` against a real SuperLink with TLS and site authentication.

One run where everything is in order, and one per FAIL line with its real cause: a kit of
another consortium (wrong CA), a key the coordinator never registered, a closed port, a data
folder with nothing usable. The registration check must leave the coordinator as it found it:
the site is not online afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from aggregator.deploy.control import ControlClient, load_site_public_key
from aggregator.deploy.superlink import flower_env, load_coordinator_kit, superlink_command
from aggregator.provision import provision
from flower_layer.processes import ProcessSet
from site_client.site_check import FAIL, OK, SKIP, exit_code, run_checks
from site_client.supernode import EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_UNREACHABLE, free_port

pytestmark = pytest.mark.slow

NAMES = ("kit", "data", "device", "disk", "resolve", "port", "tls", "registered", "clock")


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A SuperLink (TLS, site authentication) that registered site A, not site B."""
    from fed_unimiss.data.phantom import write_phantoms

    root = tmp_path_factory.mktemp("site-check")
    kits = provision(["A", "B"], root / "KITS", server_names=["127.0.0.1"])
    other = provision(["A"], root / "OTHER", server_names=["127.0.0.1"])  # another CA
    data = root / "data"
    write_phantoms(data, 0, 2, seed=3)
    kit = load_coordinator_kit(kits.coordinator)
    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with ProcessSet(root / "pids") as procs:
        link = procs.start("superlink", superlink_command(kit, fleet, control),
                           root / "superlink.log", env=flower_env(root / "flwr"))
        with ControlClient(control, kit.ca) as client:
            client.wait_ready(60, alive=lambda: link.poll() is None)
            client.register_site(load_site_public_key(kits.sites["A"] / "site.pub"), "A")
            yield SimpleNamespace(kits=kits, other=other, data=data, fleet=fleet,
                                  client=client, root=root)


def _check(kit: Path, data: Path, superlink: str, state: Path):
    args = SimpleNamespace(kit=str(kit), data=str(data), superlink=superlink,
                           state_dir=str(state), device=None, precision=None, workers=None)
    checks = run_checks(args)  # type: ignore[arg-type]
    assert [c.name for c in checks] == list(NAMES)
    return {c.name: c for c in checks}, exit_code(checks)


def test_a_registered_site_with_usable_data_passes_every_check(coordinator, tmp_path):
    checks, code = _check(coordinator.kits.sites["A"], coordinator.data, coordinator.fleet,
                          tmp_path / "state")
    assert code == 0, {n: (c.status, c.detail) for n, c in checks.items()}
    assert all(c.status == OK for c in checks.values()), checks
    assert "2 X-ray(s) usable" in checks["data"].detail
    assert coordinator.client.online_sites() == set()  # the probe left it offline


def test_the_cli_prints_one_line_per_check_and_json(coordinator, tmp_path):
    cmd = [sys.executable, "-m", "fed_unimiss.cli.main", "site", "check",
           "--kit", str(coordinator.kits.sites["B"]), "--data", str(coordinator.data),
           "--superlink", coordinator.fleet, "--state-dir", str(tmp_path / "state")]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert text.returncode == EXIT_REFUSED, text.stderr
    lines = [line for line in text.stdout.splitlines() if line and not line.startswith(" ")]
    assert [line.split()[1] for line in lines] == list(NAMES)
    assert lines[NAMES.index("registered")].startswith("FAIL")
    assert "fix: " in text.stdout and "1 failed" in text.stderr
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout)
    assert out.returncode == report["exit_code"] == EXIT_REFUSED
    assert {c["name"]: c["status"] for c in report["checks"]}["registered"] == FAIL


def test_an_unregistered_key_fails_the_registration_check(coordinator, tmp_path):
    checks, code = _check(coordinator.kits.sites["B"], coordinator.data, coordinator.fleet,
                          tmp_path / "state")
    assert code == EXIT_REFUSED
    assert checks["tls"].status == OK and checks["registered"].status == FAIL
    assert "not registered" in checks["registered"].detail
    assert "provision --add-sites" in checks["registered"].fix


def test_a_kit_of_another_consortium_fails_the_tls_check(coordinator, tmp_path):
    checks, code = _check(coordinator.other.sites["A"], coordinator.data, coordinator.fleet,
                          tmp_path / "state")
    assert code == EXIT_REFUSED
    assert checks["port"].status == OK and checks["tls"].status == FAIL
    assert "another provisioning" in checks["tls"].fix
    assert checks["registered"].status == SKIP


def test_a_closed_port_fails_the_port_check(coordinator, tmp_path):
    checks, code = _check(coordinator.kits.sites["A"], coordinator.data,
                          f"127.0.0.1:{free_port()}", tmp_path / "state")
    assert code == EXIT_UNREACHABLE
    assert checks["resolve"].status == OK and checks["port"].status == FAIL
    assert "connection refused" in checks["port"].detail
    assert [checks[n].status for n in ("tls", "registered", "clock")] == [SKIP] * 3


def test_a_data_folder_with_nothing_usable_fails_the_data_check(coordinator, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    (junk / "scan.dcm").write_bytes(b"\x00" * 200)  # a DICOM name, not a DICOM file
    checks, code = _check(coordinator.kits.sites["A"], junk, coordinator.fleet,
                          tmp_path / "state")
    assert code == EXIT_BAD_INPUT
    assert checks["data"].status == FAIL and "no usable" in checks["data"].detail
    assert checks["registered"].status == OK  # the other checks still run and say their piece


def test_a_clock_ten_minutes_ahead_fails_the_clock_check(coordinator, tmp_path, monkeypatch):
    """This machine's clock set 10 minutes ahead, as Flower's request signer reads it."""
    import datetime

    import flwr.client.grpc_rere_client.node_auth_client_interceptor as signer

    real_now = signer.now
    monkeypatch.setattr(signer, "now", lambda: real_now() + datetime.timedelta(minutes=10))
    checks, code = _check(coordinator.kits.sites["A"], coordinator.data, coordinator.fleet,
                          tmp_path / "state")
    assert code == EXIT_REFUSED
    assert checks["tls"].status == OK and checks["clock"].status == FAIL
    assert "NTP" in checks["clock"].fix and checks["registered"].status == SKIP
