"""End to end on 127.0.0.1: real SuperLink, SuperNodes, TLS, site keys, the real ServerApp/ClientApp.

Each test provisions its own kits and phantom folder (``world``: a second or two, so that the long
tests below need not share a worker):

1. three sites over TLS with site authentication, while an unregistered key, a plaintext
   SuperNode and a kit from another CA try to join (all refused, the run goes on) and site C is
   killed in the middle of round 1 (the round closes at its deadline with A and B);
2. ``fed-unimiss aggregator start`` killed with SIGKILL after round 1 and started again with the
   same RUN: it clears the leftovers and the run resumes at round 2.

Ports are chosen free at run time. Every process the tests start, directly or through Flower, is
tracked by a sampler and must be gone at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from deploy_helpers import set_site_yaml, wait_for

from aggregator.demo import write_federation_yaml
from aggregator.deploy.runner import AggregatorOptions, read_rounds, run_aggregator
from aggregator.deploy.superlink import flower_env
from aggregator.provision import provision
from fed_unimiss.processes import alive, command_line, descendants, session_members
from flower_layer.processes import ProcessSet
from site_client.supernode import EXIT_REFUSED, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ROUND_TIMEOUT = 150.0  # far above a micro X-ray round even on busy cores; a killed site
# is usually dropped earlier by Flower's heartbeat (NODE_UNAVAILABLE after ~60 s)


def _federation_yaml(path: Path, min_sites: int) -> Path:
    return write_federation_yaml(path, min_sites=min_sites, round_timeout=ROUND_TIMEOUT,
                                 local_steps=1)


def _rogue_kit(src: Path, dst: Path, name: str) -> Path:
    """A copy of a legitimate kit (same CA) holding a fresh key the coordinator never saw."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    shutil.copytree(src, dst)
    key = ec.generate_private_key(ec.SECP384R1())
    (dst / "site.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    (dst / "site.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    text = (dst / "site.yaml").read_text().replace('site_name: "A"', f'site_name: "{name}"')
    (dst / "site.yaml").write_text(text.replace("connect_timeout_s: 0\n", "connect_timeout_s: 10\n"))
    return dst


@pytest.fixture
def world(tmp_path_factory):
    from fed_unimiss.data.phantom import write_phantoms

    root = tmp_path_factory.mktemp("deploy")
    kits = provision(["A", "B", "C"], root / "KITS", server_names=["127.0.0.1"])
    foreign = provision(["A"], root / "OTHER")  # another consortium's CA
    for kit in kits.sites.values():  # a restarted coordinator is found again within seconds
        set_site_yaml(kit, reconnect_grace_s=3)
    data = root / "data"
    write_phantoms(data, 0, 2, seed=7)  # X-rays only: the cheapest site cache to build
    return {
        "root": root, "kits": kits, "data": data,
        "foreign": foreign.sites["A"],
        "rogue": _rogue_kit(kits.sites["A"], root / "KITS-rogue" / "site-X", "X"),
    }


class Sampler:
    """Records every descendant of this test process (and their sessions) until stopped."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.sessions: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._my_sid = os.getsid(0)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in descendants(os.getpid()):
                self.pids.add(pid)
                try:
                    sid = os.getsid(pid)
                except ProcessLookupError:
                    continue
                if sid != self._my_sid:
                    self.sessions.add(sid)
            self._stop.wait(0.3)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def leftovers(self) -> list[int]:
        left = {p for p in self.pids if alive(p)}
        for sid in self.sessions:
            left.update(session_members(sid))
        return sorted(left)


def _site_cmd(kit: Path, data: Path, fleet: str, state: Path) -> list[str]:
    return [PY, "-m", "fed_unimiss.cli.main", "site", "start", "--kit", str(kit),
            "--data", str(data), "--superlink", fleet, "--state-dir", str(state)]


def _crash(proc: subprocess.Popen) -> None:
    """SIGKILL a process tree at once, as a power cut would (no cleanup handlers run)."""
    tree = {proc.pid, *descendants(proc.pid)}
    for pid in list(tree):
        try:
            tree.update(session_members(os.getsid(pid)))
        except ProcessLookupError:
            pass
    tree.discard(os.getpid())
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def _clientapp_started(state: Path) -> bool:
    log = state / "logs" / "supernode.log"
    return log.exists() and "Start `flwr-clientapp` process" in log.read_text(errors="replace")


def test_tls_federation_refuses_intruders_and_survives_a_killed_site(world, tmp_path):
    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    run = tmp_path / "RUN"
    opts = AggregatorOptions(
        kit=world["kits"].coordinator, config=_federation_yaml(tmp_path / "fed.yaml", 1),
        rounds=2, out=run, fleet_address=fleet, control_address=control, wait_for_sites=3)
    logs = tmp_path / "logs"
    states = {s: tmp_path / "state" / s for s in ("A", "B", "C", "X", "F")}
    intruders: dict[str, subprocess.Popen] = {}
    killed_at_round: list[int] = []

    with Sampler() as sampler, ProcessSet(tmp_path / "pids") as procs:
        def start_sites() -> None:
            for s in ("A", "B", "C"):
                procs.start(f"site-{s}", _site_cmd(world["kits"].sites[s], world["data"], fleet,
                                                   states[s]), logs / f"site-{s}.log")

        def kill_c_mid_round() -> None:
            wait_for(lambda: _clientapp_started(states["C"]), 240, "site C to start training")
            killed_at_round.append(len(read_rounds(run)) + 1)
            _crash(procs.children.pop("site-C"))  # site CLI, SuperNode, SuperExec, ClientApp

        def on_started(_run_id: int) -> None:
            intruders["unregistered"] = procs.start(
                "site-X", _site_cmd(world["rogue"], world["data"], fleet, states["X"]),
                logs / "site-X.log")
            intruders["foreign-ca"] = procs.start(
                "site-F", _site_cmd(world["foreign"], world["data"], fleet, states["F"]),
                logs / "site-F.log")
            intruders["plaintext"] = procs.start(
                "insecure", [str(Path(PY).parent / "flower-supernode"), "--insecure",
                             "--superlink", fleet, "--max-retries", "2",
                             "--port", str(free_port())],
                logs / "insecure.log", env=flower_env(tmp_path / "flwr-insecure"))
            threading.Thread(target=kill_c_mid_round, daemon=True).start()

        outcome = run_aggregator(opts, on_ready=start_sites, on_started=on_started)
        intruder_codes = {k: p.wait(timeout=60) for k, p in intruders.items()}
    leftovers = sampler.leftovers()

    # --- the run completed with the legitimate sites
    assert outcome.ok, outcome.error
    rows = outcome.rounds
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert {"A", "B"} <= set(r["sites"]), r["sites"]
        assert not {"X", "F"} & set(r["sites"])
    assert killed_at_round == [1]
    assert "C" not in rows[0]["sites"]  # killed mid-round: closed at the deadline without it
    for n in (1, 2):
        assert (run / f"global_round_{n:04d}.safetensors").stat().st_size > 0
        assert json.loads((run / f"global_round_{n:04d}.json").read_text())["round"] == n

    # --- intruders were refused, each with the message a site operator can act on
    x_err = (logs / "site-X.log").read_text()
    assert intruder_codes["unregistered"] == EXIT_REFUSED, x_err
    assert "key is not registered" in x_err and "'X'" in x_err
    f_err = (logs / "site-F.log").read_text()
    assert intruder_codes["foreign-ca"] == EXIT_REFUSED, f_err
    assert "not signed by this kit's CA" in f_err
    # a plaintext SuperNode never gets through the TLS handshake, and gives up
    insecure = (logs / "insecure.log").read_text()
    assert intruder_codes["plaintext"] != 0, insecure
    assert "UNAVAILABLE" in insecure or "Socket closed" in insecure, insecure[-2000:]
    # --- nothing left behind, Flower's orphans included
    assert leftovers == [], leftovers


def test_unreachable_coordinator_is_reported_not_retried_forever(world, tmp_path):
    kit = tmp_path / "site-A"
    shutil.copytree(world["kits"].sites["A"], kit)
    (kit / "site.yaml").write_text((kit / "site.yaml").read_text().replace(
        "connect_timeout_s: 0\n", "connect_timeout_s: 3\n"))
    port = free_port()  # nobody listens here
    t0 = time.monotonic()
    proc = subprocess.run(_site_cmd(kit, world["data"], f"127.0.0.1:{port}", tmp_path / "st"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert f"cannot reach the coordinator at 127.0.0.1:{port} (connection refused" in proc.stderr
    assert "trying again in 2 s" in proc.stdout  # said at once, not after the whole wait
    assert time.monotonic() - t0 < 60


def test_aggregator_killed_after_round_1_resumes_at_round_2(world, tmp_path):
    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    run = tmp_path / "RUN"
    cmd = [PY, "-m", "fed_unimiss.cli.main", "aggregator", "start",
           "--kit", str(world["kits"].coordinator),
           "--config", str(_federation_yaml(tmp_path / "fed.yaml", 2)), "--rounds", "2",
           "--out", str(run), "--address", fleet, "--control-address", control,
           "--wait-for-sites", "2", "--wait-timeout", "240"]
    with Sampler() as sampler, ProcessSet(tmp_path / "pids") as procs:
        first = procs.start("aggregator-1", cmd, tmp_path / "aggregator-1.log")
        for s in ("A", "B"):  # sites wait until the SuperLink is up
            procs.start(f"site-{s}", _site_cmd(world["kits"].sites[s], world["data"], fleet,
                                               tmp_path / "state" / s), tmp_path / f"site-{s}.log")
        wait_for(lambda: len(read_rounds(run)) >= 1 or first.poll() is not None, 300,
                  "round 1")
        assert first.poll() is None, (tmp_path / "aggregator-1.log").read_text()
        # A crash: no cleanup, the SuperLink lives on. Its orphaned ServerApp is paused too, as
        # a hung one would be; running on, it could finish round 2 before the resume starts.
        assert _pause_serverapps(run / "pids"), "no ServerApp of the first aggregator found"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        procs.children.pop("aggregator-1")
        assert len(read_rounds(run)) == 1

        second = subprocess.run(cmd, capture_output=True, text=True, timeout=400)

        # the guide's resume with another --rounds: refused before anything starts, one line
        other = subprocess.run([*cmd[:cmd.index("--rounds") + 1], "3",
                                *cmd[cmd.index("--rounds") + 2:]],
                               capture_output=True, text=True, timeout=120)
    leftovers = sampler.leftovers()

    assert second.returncode == 0, second.stderr[-3000:]
    assert "leftover process" in second.stderr  # the crashed aggregator's SuperLink was ended
    assert "round 2/2" in second.stdout and "round 1/2" not in second.stdout
    # the resume waited for the sites of round 1, and said so
    assert "resuming after round 1: waiting up to" in second.stdout, second.stdout
    assert "site(s) of round 1 online" in second.stdout or "going on without" in second.stdout
    assert other.returncode == 2, other.stderr
    assert "Traceback" not in other.stderr and "started" not in other.stdout
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rounds: saved 2, now 3" in errors[0], other.stderr
    rows = read_rounds(run)
    assert [r["round"] for r in rows] == [1, 2]
    assert (run / "global_round_0002.safetensors").exists()
    status = subprocess.run([PY, "-m", "fed_unimiss.cli.main", "aggregator", "status",
                             "--out", str(run), "--json"], capture_output=True, text=True)
    summary = json.loads(status.stdout)
    assert summary["rounds_done"] == 2 and summary["status"] == "finished:completed"
    by_kit = subprocess.run([PY, "-m", "fed_unimiss.cli.main", "aggregator", "status",
                             "--kit", str(world["kits"].coordinator)], capture_output=True,
                            text=True)
    assert by_kit.returncode == 0 and "rounds done: 2/2" in by_kit.stdout
    assert leftovers == [], leftovers


def _pause_serverapps(pid_dir: Path) -> list[int]:
    """SIGSTOP the ServerApps in the trees and sessions an aggregator recorded in ``pid_dir``."""
    pids: set[int] = set()
    for record in pid_dir.glob("*.pid"):
        rec = json.loads(record.read_text())
        pids.update(descendants(int(rec["pid"])))
        for sid in rec.get("sessions", []):
            pids.update(session_members(int(sid)))
    paused = [p for p in sorted(pids) if "serverapp" in command_line(p)]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    return paused


def _replied(state: Path, round_num: int) -> bool:
    """The site's shim has handed its train reply of ``round_num`` back to Flower."""
    log = state / "logs" / "shim-timing.jsonl"
    if not log.exists():
        return False
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("kind") == "train" and str(entry.get("round")) == str(round_num):
            return True
    return False


def _worker_busy(state: Path) -> bool:
    log = state / "logs" / "worker.log"
    return log.exists() and "train request (round work) started" in log.read_text(errors="replace")


def test_worker_killed_mid_round_fails_that_round_for_its_site_then_serves_the_next(world,
                                                                                     tmp_path):
    """SIGKILL site A's warm worker while it trains round 1, and again between rounds 2 and 3
    (compressed exchange on).

    A's shim sees the worker vanish and answers error 5004 at once, so round 1 closes with B
    alone (min_sites 1) without waiting for any deadline; `site start` restarts the worker and
    A takes part in round 2. The worker killed after its round-2 reply loses nothing: the
    restarted one takes the exchange's memory back from the state directory, so in round 3 A
    is sent the int8 delta like B (not the full base) and answers with no refusal.
    """
    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    run = tmp_path / "RUN"
    config = write_federation_yaml(tmp_path / "fed.yaml", min_sites=1,
                                   round_timeout=ROUND_TIMEOUT, local_steps=12)
    assert "q8_delta" in config.read_text()  # the shipped exchange, compressed
    opts = AggregatorOptions(kit=world["kits"].coordinator, config=config, rounds=3, out=run,
                             fleet_address=fleet, control_address=control, wait_for_sites=2)
    states = {s: tmp_path / "state" / s for s in ("A", "B")}
    killed: list[int] = []

    with Sampler() as sampler, ProcessSet(tmp_path / "pids") as procs:
        def start_sites() -> None:
            for s in ("A", "B"):
                procs.start(f"site-{s}", _site_cmd(world["kits"].sites[s], world["data"], fleet,
                                                   states[s]), tmp_path / f"site-{s}.log")

        def kill_worker_mid_round() -> None:
            wait_for(lambda: _worker_busy(states["A"]), 240, "site A's worker to start training")
            pid = int((states["A"] / "worker.pid").read_text())
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: _replied(states["A"], 2), 240, "site A's reply in round 2")
            pid = int((states["A"] / "worker.pid").read_text())
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)  # idle, between rounds 2 and 3

        def on_started(_run_id: int) -> None:
            threading.Thread(target=kill_worker_mid_round, daemon=True).start()

        t0 = time.monotonic()
        outcome = run_aggregator(opts, on_ready=start_sites, on_started=on_started)
        elapsed = time.monotonic() - t0
        restarted = int((states["A"] / "worker.pid").read_text())
    leftovers = sampler.leftovers()

    assert outcome.ok, outcome.error
    rows = outcome.rounds
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert len(killed) == 2 and restarted not in killed
    assert rows[0]["sites"] == ["B"]
    # an error reply carries no content, so no site label: the node id names A
    assert [why for why in rows[0]["rejected"].values() if "code 5004" in why], rows[0]["rejected"]
    assert "worker stopped" in next(iter(rows[0]["rejected"].values()))
    assert rows[1]["sites"] == ["A", "B"] and rows[1]["rejected"] == {}
    assert rows[1]["bytes_down"]["A"] > 2 * rows[1]["bytes_down"]["B"]  # A's base came in full
    assert rows[2]["sites"] == ["A", "B"] and rows[2]["rejected"] == {}
    assert rows[2]["bytes_down"]["A"] == rows[2]["bytes_down"]["B"]  # the delta: nothing lost
    assert elapsed < ROUND_TIMEOUT  # round 1 never waited for its deadline
    from fed_unimiss.checkpoint import load_checkpoint

    state, _ = load_checkpoint(run / "global_round_0003.safetensors")
    fp32_bytes = 4 * sum(t.numel() for t in state.values())
    for row in rows:
        assert row["exchange"].startswith("down=q8_delta up=q8_delta")
        assert row["bytes_up"]["B"] < 0.3 * fp32_bytes
    worker_log = (states["A"] / "logs" / "worker.log").read_text()
    assert worker_log.count("ready on") == 3  # started once, restarted twice
    assert "exchange memory of run" in worker_log
    assert "site worker exited" in (tmp_path / "site-A.log").read_text()
    assert leftovers == [], leftovers


def test_secure_aggregation_over_tls_sums_updates_the_aggregator_cannot_read(world, tmp_path):
    """Three sites x 3 rounds with ``exchange.up: secure`` (1 local step): each round is the
    train instruction plus three stages through the SuperLink; every site keeps its party in
    its warm worker between them. The kits' roster/ is what sites and aggregator verify keys
    with. Each site's reply holds no readable update (0.5x the fp32 bytes, masked), and
    rounds.jsonl records no per-site norm.

    The global model is the plain exchange's within quantisation error: the same federation
    with ``up: fp32`` (the screening mode), run in process with the same sites and seeds, is
    the reference. Round 1 starts both from the same state with the same site seeds, so each
    coordinate is within one ring step of its part. Later rounds train from states that differ
    by that much, and Adam's normalised steps spread such differences: over 6 in-process runs
    of this federation with fresh rounding, the cosine of the whole 3-round trajectory to the
    plain one ranged down to 0.88, so no trajectory threshold is safe here. The last round is
    held instead to what only a wrong sum can break: every coordinate within the rounds'
    quantisation steps plus, for rounds 2 and 3, the largest move each run may make (the
    ring's clip, derived from Adam's step bound)."""
    import yaml

    from aggregator.simulate_cli import simulate
    from fed_unimiss.checkpoint import load_checkpoint

    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    run = tmp_path / "RUN"
    config = _federation_yaml(tmp_path / "fed.yaml", 3)
    cfg = yaml.safe_load(config.read_text())
    cfg["exchange"] = {"down": "fp32", "up": "secure", "teacher": "exchanged"}
    cfg["local_steps"] = 2  # the student moves in round 1 (its learning rate starts at 0)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    opts = AggregatorOptions(kit=world["kits"].coordinator, config=config, rounds=3, out=run,
                             fleet_address=fleet, control_address=control, wait_for_sites=3)
    with Sampler() as sampler, ProcessSet(tmp_path / "pids") as procs:
        def start_sites() -> None:
            for s in ("A", "B", "C"):
                procs.start(f"site-{s}", _site_cmd(world["kits"].sites[s], world["data"], fleet,
                                                   tmp_path / "state" / s),
                            tmp_path / f"site-{s}.log")

        t0 = time.monotonic()
        outcome = run_aggregator(opts, on_ready=start_sites)
        elapsed = time.monotonic() - t0
    leftovers = sampler.leftovers()

    assert outcome.ok, outcome.error
    rows = outcome.rounds
    assert [r["round"] for r in rows] == [1, 2, 3]
    state, _ = load_checkpoint(run / "global_round_0003.safetensors")
    fp32_bytes = 4 * sum(t.numel() for t in state.values())
    for row in rows:
        assert row["sites"] == ["A", "B", "C"] and row["rejected"] == {}
        assert row["exchange"] == "down=fp32 up=secure teacher=exchanged"
        screening = row["screening"]
        assert screening["mode"] == "secure" and screening["survivors"] == 3
        assert screening["dropped_before_upload"] == [] and screening["clipped"] == 0
        for site, entry in row["per_site"].items():
            assert not {"update_norm", "norms", "vs_median"} & set(entry), site
            assert 0.5 * fp32_bytes <= row["bytes_up"][site] <= 0.52 * fp32_bytes
        assert {f"secure_{s}_s" for s in ("share_keys", "masked_input", "unmask")} \
            <= set(row["phases"])
    assert "secure aggregation: roster of 3 site(s)" in (run / "logs" / "serverapp.log") \
        .read_text()
    print(f"secure TLS run: 3 sites x 3 rounds in {elapsed:.1f} s")
    assert leftovers == [], leftovers

    cfg["exchange"]["up"] = "fp32"
    plain_config = tmp_path / "plain.yaml"
    plain_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    plain = tmp_path / "PLAIN"
    simulate(plain_config, [(s, world["data"]) for s in ("A", "B", "C")], 3, plain)
    s1, _ = load_checkpoint(run / "global_round_0001.safetensors")
    p1, _ = load_checkpoint(plain / "global_round_0001.safetensors")
    steps = rows[0]["screening"]["ring"]["step"]
    for part in ("student", "teacher", "center"):
        worst = max(float((s1[n] - p1[n]).abs().max()) for n in s1 if n.startswith(part))
        print(f"secure vs plain, round 1, {part}: {worst / steps[part]:.3f} of a step")
        assert worst <= steps[part] * 1.01, (part, worst, steps[part])
    p3, _ = load_checkpoint(plain / "global_round_0003.safetensors")
    levels = rows[0]["screening"]["ring"]["levels"]
    for part in ("student", "teacher", "center"):
        steps_by_round = [r["screening"]["ring"]["step"][part] for r in rows]
        bound = sum(steps_by_round) + 2 * levels * sum(steps_by_round[1:])
        worst = max(float((state[n] - p3[n]).abs().max()) for n in state if n.startswith(part))
        print(f"secure vs plain, round 3, {part}: {worst / bound:.3f} of the bound")
        assert worst <= 1.05 * bound, (part, worst, bound)
