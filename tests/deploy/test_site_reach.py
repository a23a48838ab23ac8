"""A site finds out in seconds what waiting cannot fix: a coordinator name that does not
resolve, or a certificate that does not cover the name dialled or comes from another CA; a
coordinator that is merely not up is "waiting", never fatal.

The servers are the standard library's TLS with the certificates ``fed-unimiss provision``
writes, on loopback addresses (127.0.0.2 is loopback too, and not in the certificate).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from aggregator.provision import provision
from site_client.coordinator_wait import RETRY_MAX_S, CoordinatorWait
from site_client.reach import probe_coordinator
from site_client.supernode import free_port


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    root = tmp_path_factory.mktemp("reach")
    return {"ours": provision(["A"], root / "KITS", server_names=["fl.example.org"]),
            "other": provision(["A"], root / "OTHER", server_names=["fl.example.org"])}


@contextmanager
def tls_server(coordinator: Path, host: str) -> Iterator[str]:
    """A TLS listener with the coordinator's certificate; it completes handshakes and closes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(coordinator / "server.crt", coordinator / "server.key")
    context.set_alpn_protocols(["h2"])
    listener = socket.create_server((host, 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: that is what is tested
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"{host}:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_the_provisioned_certificate_passes(kits):
    with tls_server(kits["ours"].coordinator, "127.0.0.1") as address:
        reach = probe_coordinator(address, kits["ours"].sites["A"] / "ca.crt")
    assert reach.ok and not reach.certain


def test_a_name_the_certificate_does_not_cover_is_certain(kits):
    with tls_server(kits["ours"].coordinator, "127.0.0.2") as address:
        reach = probe_coordinator(address, kits["ours"].sites["A"] / "ca.crt")
    assert reach.kind == "name-mismatch" and reach.certain, reach
    assert "mismatch" in reach.detail


def test_a_certificate_from_another_ca_is_certain(kits):
    with tls_server(kits["other"].coordinator, "127.0.0.1") as address:
        reach = probe_coordinator(address, kits["ours"].sites["A"] / "ca.crt")
    assert reach.kind == "foreign-ca" and reach.certain, reach


def test_a_name_that_does_not_resolve_is_certain(kits):
    reach = probe_coordinator("no-such-host.invalid:9092", kits["ours"].sites["A"] / "ca.crt")
    assert reach.kind == "no-such-name" and reach.certain, reach


def test_nothing_listening_is_waited_for(kits):
    reach = probe_coordinator(f"127.0.0.1:{free_port()}", kits["ours"].sites["A"] / "ca.crt")
    assert reach.kind == "waiting" and not reach.certain
    assert "connection refused" in reach.detail


def test_backoff_doubles_to_its_cap_and_says_each_new_reason_once():
    said: list[str] = []
    now = [0.0]
    wait = CoordinatorWait("A", "fl.example.org:9092", 0, said.append, clock=lambda: now[0])
    delays = []
    for _ in range(8):
        delays.append(wait.next_delay("connection refused"))
        now[0] += delays[-1]
    assert delays[:4] == [2, 4, 8, 16] and delays[-1] == RETRY_MAX_S
    assert len(said) == 1 and "trying again in 2 s" in said[0]
    wait.next_delay("no answer in 5 s")
    assert len(said) == 2
    assert not wait.expired()  # 0: until stopped
    wait.connected()
    assert wait.next_delay("connection refused") == 2


def test_a_site_that_never_connected_gives_up_after_connect_timeout():
    now = [0.0]
    wait = CoordinatorWait("A", "h:1", 5, lambda _: None, clock=lambda: now[0])
    assert wait.next_delay("x") == 2 and not wait.expired()
    now[0] = 4.0
    assert wait.next_delay("x") == 1  # never past the deadline
    now[0] = 5.0
    assert wait.expired()
    wait.connected()  # once connected, a site waits until stopped
    assert not wait.expired()


def test_reconnect_grace_reaches_the_supernode_and_a_bad_value_is_named(kits, tmp_path):
    """site.yaml's grace becomes Flower's --max-wait-time; 0 or an hour-plus is refused."""
    import shutil

    from site_client.supernode import SiteError, load_site_kit, supernode_command

    kit_dir = shutil.copytree(kits["ours"].sites["A"], tmp_path / "site-A")
    text = (kit_dir / "site.yaml").read_text()
    kit = load_site_kit(kit_dir)
    assert kit.settings.reconnect_grace_s == 30
    cmd = supernode_command(kit, "127.0.0.1:1", tmp_path / "n.toml", 2, 7.0)
    assert cmd[cmd.index("--max-wait-time") + 1] == "7"
    for bad in ("0", "7200"):
        (kit_dir / "site.yaml").write_text(text.replace("reconnect_grace_s: 30",
                                                        f"reconnect_grace_s: {bad}"))
        with pytest.raises(SiteError, match=r"site.yaml.*reconnect_grace_s: .* outside 1-3600"):
            load_site_kit(kit_dir)


def _site_start(kit: Path, data: Path, superlink: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fed_unimiss.cli.main", "site", "start",
                           "--kit", str(kit), "--data", str(data), "--superlink", superlink,
                           "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_site_start_against_a_certificate_for_another_name_exits_4_before_any_supernode(
        kits, tmp_path):
    """site.yaml's default waits until stopped: only the probe's certainty ends this."""
    from fed_unimiss.data.phantom import write_phantoms

    write_phantoms(tmp_path / "data", 0, 2, seed=3)
    kit = kits["ours"].sites["A"]
    assert "connect_timeout_s: 0\n" in (kit / "site.yaml").read_text()
    with tls_server(kits["ours"].coordinator, "127.0.0.2") as address:
        out = _site_start(kit, tmp_path / "data", address, tmp_path / "st")
    assert out.returncode == 4, out.stderr
    assert "certificate does not cover the name '127.0.0.2'" in out.stderr, out.stderr
    assert not (tmp_path / "st" / "logs" / "supernode.log").exists()  # found before dialling
