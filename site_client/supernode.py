"""``fed-unimiss site start`` as a function: check the kit and the data, run Flower's SuperNode.

What a hospital's IT staff needs from this command is a clear answer to "is this site taking
part, and if not, why?". Before anything touches the network the kit is verified (the CA
certificate parses, the private key is a NIST EC key in OpenSSH format and matches the kit's
public key) and the data folder is scanned in-process with the same scan as ``fed-unimiss data
check``; nothing usable means exit code 2 before the coordinator is ever contacted.

Then ``flower-supernode`` (this venv's own executable) runs in its own session with TLS, the
site key and a node config (data path, state dir, site name) written as a TOML file into the
state dir. Its output goes to STATE/logs/supernode.log. Flower's own refusals are mapped to
actionable messages (docs/flower.md, "Refusals"): an unregistered key exits with ``[code: 2004]``,
a certificate from another CA with ``CERTIFICATE_VERIFY_FAILED``. Before each SuperNode start
the coordinator is probed (site_client/reach.py): a name that does not resolve or a certificate
that does not match ends the command in seconds; a coordinator that is not up, or whose run
has ended, is waited for (site_client/coordinator_wait.py).

Exit codes: 0 stopped by the operator, 2 bad kit or data, 3 coordinator unreachable (a name
that does not resolve, or ``connect_timeout_s`` spent before the first connection), 4 refused
by the coordinator (key or certificate), 1 anything else (see the log).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fed_unimiss.config import ConfigError, load_yaml
from fed_unimiss.exchange import (
    NODE_DATA_PATH,
    NODE_IDENTITY_KEY,
    NODE_ROSTER,
    NODE_SITE_NAME,
    NODE_STATE_DIR,
    NODE_WORKER_SOCKET,
)
from fed_unimiss.privacy.config import PrivacyConfig, with_dp_settings
from fed_unimiss.processes import terminate_pids
from fed_unimiss.runtime import Runtime
from site_client.coordinator_wait import CoordinatorWait
from site_client.local_state import PROGRESS_FILE
from site_client.privacy_ledger import privacy_node_config
from site_client.probe_settings import SiteProbe, probe_folder, site_probe_node_config
from site_client.reach import Reach, probe_coordinator, split_address
from site_client.worker import WorkerProcess

__all__ = [
    "SiteSettings",
    "SiteKit",
    "SiteError",
    "load_site_kit",
    "check_site_data",
    "supernode_command",
    "site_privacy_settings",
    "site_node_config",
    "diagnose_supernode_log",
    "run_supernode",
    "EXIT_BAD_INPUT",
    "site_runtime",
    "EXIT_UNREACHABLE",
    "EXIT_REFUSED",
]

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4


class SiteError(RuntimeError):
    """A problem the site's operator can fix; ``code`` is the command's exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SiteSettings:
    """``site.yaml`` in a site kit (written by ``fed-unimiss provision``)."""

    # This site's name as provisioned; the coordinator's logs and rounds.jsonl show it.
    site_name: str = ""
    # The coordinator's Fleet address HOST:PORT; the only outbound connection the site makes.
    superlink: str = "127.0.0.1:9092"
    # Site-local state (logs, caches, DP accountant); relative paths are relative to the kit.
    state_dir: str = "state"
    # Seconds to keep trying to reach the coordinator before the first connection, then exit
    # code 3; 0 = until stopped. Once connected, the site waits for the next run until stopped.
    connect_timeout_s: float = 0.0
    # Seconds a connected SuperNode keeps retrying a lost coordinator by itself (Flower's
    # --max-wait-time) before the site notices that the run ended and waits for the next one.
    # Long enough to ride out a network blip without starting Flower again; a shorter value
    # makes the site notice the end of a run sooner.
    reconnect_grace_s: float = 30.0
    # Differential privacy of everything this site sends (docs/privacy.md); off unless
    # `privacy.enabled: true` here or `site start --dp-epsilon E`. The flags override this.
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Where this site trains (docs/site-guide.md, "Hardware"); `site start --device/--precision/
    # --workers` override. auto = CUDA if present, else Apple MPS, else CPU.
    device: str = "auto"
    # fp32, or bf16/fp16 autocast with fp32 weights (bf16 on recent CPUs and GPUs).
    precision: str = "fp32"
    # Data-parallel processes per round (one GPU each on CUDA); DP sites train with 1.
    workers: int = 1
    # A labelled probe set ({data: DIR, task: seg3d, config: YAML}): the site probes the global
    # model on it when the federation asks (probe_every) and sends balanced accuracies only.
    probe: SiteProbe | None = None

    def validate(self) -> None:
        if not self.site_name:
            raise ValueError("site_name: empty; the kit was not written by `fed-unimiss provision`")
        host, sep, port = self.superlink.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"superlink: expected HOST:PORT, got {self.superlink!r}")
        if self.connect_timeout_s < 0:
            raise ValueError("connect_timeout_s: must be 0 (until stopped) or positive")
        if not 1 <= self.reconnect_grace_s <= 3600:
            raise ValueError(f"reconnect_grace_s: {self.reconnect_grace_s} is outside 1-3600 "
                             "seconds (Flower's SuperNode retries a lost coordinator this long)")
        try:
            self.privacy.validate()
        except ValueError as e:
            raise ValueError(f"privacy.{e}") from None
        check_runtime(self.runtime(), self.privacy)

    def runtime(self) -> Runtime:
        return Runtime(device=self.device, precision=self.precision,  # type: ignore[arg-type]
                       workers=self.workers)


def check_runtime(runtime: Runtime, privacy: PrivacyConfig | None) -> None:
    """Raise ``ValueError`` naming the setting if this site cannot train with ``runtime``."""
    try:
        runtime.validate()
    except ValueError as e:
        raise ValueError(str(e).replace("device ", "device: ", 1)
                         .replace("precision ", "precision: ", 1)) from None
    if privacy is not None and privacy.enabled:
        if runtime.precision != "fp32":
            raise ValueError(f"precision: {runtime.precision} with differential privacy; DP-SGD "
                             "clips and noises per-patient gradients in fp32 (set fp32)")
        if runtime.workers > 1:
            raise ValueError(f"workers: {runtime.workers} with differential privacy; DP-SGD "
                             "draws one Poisson sample and one noise per step in one process "
                             "(set 1)")


@dataclass(frozen=True)
class SiteKit:
    root: Path
    ca: Path
    key: Path
    settings: SiteSettings


def site_runtime(kit: SiteKit, args: Any, privacy: PrivacyConfig) -> Runtime:
    """site.yaml's device/precision/workers with the flags on top (``args.device``,
    ``.precision``, ``.workers``; None keeps site.yaml's); errors name both."""
    import dataclasses

    settings = kit.settings
    runtime = dataclasses.replace(
        settings.runtime(),
        **{k: v for k, v in (("device", args.device), ("precision", args.precision),
                             ("workers", args.workers)) if v is not None})
    try:
        check_runtime(runtime, privacy)
    except ValueError as e:
        raise SiteError(f"{kit.root / 'site.yaml'} + flags: {e}", EXIT_BAD_INPUT) from None
    return runtime


# ---------------------------------------------------------------- kit and data checks


def load_site_kit(kit: str | Path) -> SiteKit:
    """Read and verify a site kit.

    Raises:
        SiteError: (code 2) a missing or unreadable file, a CA that is not a certificate, a key
            that is not an EC private key, or a key that does not match ``site.pub``.
    """
    root = Path(kit).expanduser().resolve()
    settings_file = root / "site.yaml"
    if not settings_file.is_file():
        raise SiteError(f"{root}: not a site kit (no site.yaml); pass the KITS/site-NAME folder "
                        "you received from the coordinator", EXIT_BAD_INPUT)
    try:
        settings = load_yaml(SiteSettings, settings_file)
    except ConfigError as e:
        raise SiteError(str(e), EXIT_BAD_INPUT) from e
    if settings.probe is not None and not probe_folder(settings.probe, root).is_dir():
        raise SiteError(f"{settings_file}: probe.data: {probe_folder(settings.probe, root)} is "
                        "not a folder", EXIT_BAD_INPUT)
    ca, key, pub = root / "ca.crt", root / "site.key", root / "site.pub"
    try:
        x509.load_pem_x509_certificate(ca.read_bytes())
    except OSError as e:
        raise SiteError(f"{ca}: cannot read the CA certificate ({e.strerror})", EXIT_BAD_INPUT) from e
    except ValueError as e:
        raise SiteError(f"{ca}: not a PEM certificate ({e})", EXIT_BAD_INPUT) from e
    try:
        private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    except OSError as e:
        raise SiteError(f"{key}: cannot read the site key ({e.strerror})", EXIT_BAD_INPUT) from e
    except (ValueError, TypeError) as e:
        raise SiteError(f"{key}: not an unencrypted OpenSSH private key ({e})", EXIT_BAD_INPUT) from e
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise SiteError(f"{key}: not an EC key (Flower needs a NIST EC key)", EXIT_BAD_INPUT)
    if key.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; restrict it with: chmod 600 %s", key, key)
    if pub.is_file():
        mine = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH)
        if pub.read_bytes().split()[:2] != mine.split()[:2]:
            raise SiteError(f"{key} does not match {pub}: the kit was mixed from two "
                            "provisionings; ask the coordinator for this site's kit again",
                            EXIT_BAD_INPUT)
    return SiteKit(root=root, ca=ca, key=key, settings=settings)


def check_site_data(data: str | Path) -> dict[str, int]:
    """Scan ``data`` as ``fed-unimiss data check`` does; counts only (nothing identifying).

    Raises:
        SiteError: (code 2) the folder does not exist or holds nothing usable.
    """
    from fed_unimiss.data.scan import scan  # imported late: pydicom/nibabel are slow to import

    data = Path(data).expanduser().resolve()
    if not data.is_dir():
        raise SiteError(f"--data {data}: no such folder", EXIT_BAD_INPUT)
    report = scan(data)
    summary = report.summary()
    if not report.usable:
        reasons = "; ".join(f"{r.path}: {r.reason}" for r in report.rejected[:3])
        raise SiteError(
            f"--data {data}: no usable CT volume or X-ray among {summary['files_seen']} file(s)"
            + (f" (e.g. {reasons})" if reasons else "")
            + ". Run `fed-unimiss data check` on the folder for the full list.",
            EXIT_BAD_INPUT,
        )
    return summary


# ---------------------------------------------------------------- privacy and node config

def site_privacy_settings(kit: SiteKit, flags: dict[str, Any] | None = None) -> PrivacyConfig:
    """The site's PrivacyConfig: site.yaml's ``privacy`` section with the ``--dp-*`` flags on top.

    ``flags`` maps argparse dests (``dp_epsilon``, ...) to values; None = flag not given.

    Raises:
        SiteError: (code 2) a DP flag other than --dp-epsilon given while DP is off, or a value
            out of range (the message names the flag and the file).
    """
    given = {k.replace("_", "-"): v for k, v in (flags or {}).items() if v is not None}
    try:
        return with_dp_settings(kit.settings.privacy, given,
                                f"{kit.root / 'site.yaml'} privacy + flags",
                                spell=lambda key: f"--{key}",
                                fix=f"add --dp-epsilon E, or set privacy.enabled: true in "
                                    f"{kit.root / 'site.yaml'}")
    except ConfigError as e:
        raise SiteError(str(e), EXIT_BAD_INPUT) from e


def site_node_config(kit: SiteKit, data: Path, state: Path,
                     privacy: PrivacyConfig | None = None,
                     runtime: Runtime | None = None) -> dict[str, Any]:
    """The SuperNode's node config: data path, state dir, site name, the site's runtime
    (device, precision, workers) and the dp-* keys.

    The ClientApp reads it back with ``site_client.privacy_ledger.site_privacy`` for every
    message; it stays on the site's machine (Flower never sends node config to the SuperLink).
    """
    return {
        NODE_DATA_PATH: str(Path(data).resolve()),
        NODE_STATE_DIR: str(state),
        NODE_SITE_NAME: kit.settings.site_name,
        **(runtime or kit.settings.runtime()).to_node_config(),
        **privacy_node_config(privacy),
        **site_probe_node_config(kit.settings.probe, kit.root),
        **secure_node_config(kit),
    }


def secure_node_config(kit: SiteKit) -> dict[str, str]:
    """The identity key and roster ``exchange.up: secure`` signs and verifies with (the kit's
    site.key and roster/, paths only); none when the kit predates rosters."""
    roster = kit.root / "roster"
    if not roster.is_dir():
        return {}
    return {NODE_IDENTITY_KEY: str(kit.key), NODE_ROSTER: str(roster)}


# ---------------------------------------------------------------- the SuperNode process


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (for the SuperNode's local ClientApp API)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def supernode_command(
    kit: SiteKit, superlink: str, node_config: Path, clientapp_port: int, max_wait_s: float
) -> list[str]:
    exe = Path(sys.executable).parent / "flower-supernode"
    return [
        str(exe),
        "--root-certificates", str(kit.ca),
        "--superlink", superlink,
        "--auth-supernode-private-key", str(kit.key),
        "--node-config", str(node_config),
        "--max-wait-time", str(max(1, round(max_wait_s))),
        "--host", "127.0.0.1",
        "--port", str(clientapp_port),
    ]


def _key_refused(site: str, superlink: str) -> str:
    return (f"the coordinator at {superlink} refused this site: its key is not registered. "
            f"Ask the coordinator to register site {site!r} (re-provision it, or restart "
            "`fed-unimiss aggregator start` with a kit that lists this site).")


def _foreign_ca(superlink: str) -> str:
    return (f"the coordinator's certificate at {superlink} is not signed by this kit's CA "
            "(ca.crt): this kit belongs to another provisioning, or the address points at "
            "another server. Ask the coordinator for the current kit.")


def _name_mismatch(host: str) -> str:
    return (f"the coordinator's certificate does not cover the name {host!r} this site dials; "
            "use one of the names the coordinator provisioned (--server-name), or ask for "
            "a certificate that includes it.")


def _unresolved(superlink: str, phrase: str) -> str:
    host = split_address(superlink)[0]
    return (f"cannot reach the coordinator at {superlink}: the name {host!r} cannot be "
            f"resolved ({phrase}). Check the address in site.yaml (or --superlink) and "
            "this machine's DNS.")


def _unreachable(superlink: str, cause: str | None) -> str:
    return (f"cannot reach the coordinator at {superlink}" + (f" ({cause})" if cause else "")
            + ": check the address in site.yaml (or --superlink), that the coordinator is "
            "running, and that outbound TCP to that port is allowed by the hospital firewall.")


def reach_error(reach: Reach, superlink: str) -> SiteError:
    """The SiteError for a probe whose cause is certain (``reach.certain``)."""
    if reach.kind == "no-such-name":
        return SiteError(_unresolved(superlink, reach.detail), EXIT_UNREACHABLE)
    if reach.kind == "name-mismatch":
        return SiteError(_name_mismatch(split_address(superlink)[0]), EXIT_REFUSED)
    if reach.kind == "foreign-ca":
        return SiteError(_foreign_ca(superlink), EXIT_REFUSED)
    return SiteError(f"the coordinator's certificate at {superlink} is not accepted with this "
                     f"kit's CA (ca.crt): {reach.detail}. Ask the coordinator to renew it.",
                     EXIT_REFUSED)


def diagnose_supernode_log(text: str, site: str, superlink: str) -> tuple[str, int] | None:
    """Map Flower's SuperNode output to (actionable message, exit code), or None if unknown."""
    if "[code: 2004]" in text or "Failed to activate SuperNode" in text or "[code: 2001]" in text:
        return _key_refused(site, superlink), EXIT_REFUSED
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return _foreign_ca(superlink), EXIT_REFUSED
    if "Hostname Verification" in text or "IP address mismatch" in text:
        return _name_mismatch(split_address(superlink)[0]), EXIT_REFUSED
    for phrase in ("Domain name not found", "Name or service not known", "DNS resolution failed",
                   "Temporary failure in name resolution"):
        if phrase in text:
            return _unresolved(superlink, phrase), EXIT_UNREACHABLE
    causes = {"Connection refused": "connection refused: nothing listens at that address",
              "DEADLINE_EXCEEDED": "no answer in time (a firewall may drop the packets)",
              "Socket closed": "the connection was closed",
              "failed to connect": "failed to connect"}
    unreachable = ("UNAVAILABLE", "Connection attempt failed", "Giving up reconnection",
                   *causes)
    if any(s in text for s in unreachable):
        cause = next((why for s, why in causes.items() if s in text), None)
        return _unreachable(superlink, cause), EXIT_UNREACHABLE
    return None


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


CONNECTED = "SuperNode ID:"  # logged once the SuperLink accepted this node
# Flower gave up on the coordinator but the process may linger half-dead (a retrying thread
# keeps it alive); seen after the coordinator restarted mid-round.
GAVE_UP = ("Giving up reconnection", "SuperNode terminated gracefully")


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")  # Flower colours its log lines unconditionally


def _copy_output(stream: Any, log_path: Path) -> None:
    """Copy the SuperNode's output into its log, without terminal colour codes."""
    with open(log_path, "ab") as out:
        for line in iter(stream.readline, b""):
            out.write(ANSI.sub(b"", line))
            out.flush()
    stream.close()


class SiteProgress:
    """What the site's operator sees on the terminal: connected, and each round's outcome.

    Reads the SuperNode's log (for Flower's "connected" line) and ``STATE/progress.jsonl``
    (written by the ClientApp, site_client/local_state.py) from where they were at start.
    """

    def __init__(self, site: str, superlink: str, state: Path, log_path: Path,
                 say: Callable[[str], None] | None = None) -> None:
        # flushed at once: a service's log or a redirected terminal must show it as it happens
        self.say = say or (lambda text: print(text, flush=True))
        self.site, self.superlink = site, superlink
        self.progress = state / PROGRESS_FILE
        self.log_path = log_path
        self.offset = self.progress.stat().st_size if self.progress.exists() else 0
        self.connected = False

    def poll(self, log_start: int) -> None:
        if not self.connected and CONNECTED in _read_from(self.log_path, log_start):
            self.connected = True
            self.say(f"site {self.site}: connected to the coordinator at {self.superlink}; "
                     "waiting for rounds")
        try:
            with open(self.progress, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self.say(format_event(self.site, event))

    def reset(self) -> None:
        """A new SuperNode process: say "connected" again once it is."""
        self.connected = False


def format_event(site: str, event: dict[str, Any]) -> str:
    """One terminal line for a ClientApp event (trained / refused / failed, or the coordinator's
    decision on an update: rejected / clipped)."""
    head = f"site {site}: round {event.get('round', '?')}"
    kind = event.get("event")
    if kind == "trained":
        parts = []
        if isinstance(event.get("steps"), (int, float)):
            parts.append(f"{int(event['steps'])} step(s)")
        if isinstance(event.get("seconds"), (int, float)):
            parts.append(f"{event['seconds']:.1f} s")
        losses = [f"{k[-2:].upper()} {event[k]:.3f}" for k in ("loss_2d", "loss_3d")
                  if isinstance(event.get(k), (int, float))]
        if losses:
            parts.append("loss " + ", ".join(losses))
        if isinstance(event.get("epsilon"), (int, float)):
            parts.append(f"DP epsilon spent {event['epsilon']:.3f}")
        if isinstance(event.get("adopted"), str):  # site_client/dp_plan.py
            parts.append(event["adopted"])
        return f"{head}: trained ({', '.join(parts)}); update sent"
    if kind == "refused":
        return f"{head}: REFUSED: {event.get('why', 'see the log')}"
    if kind in ("rejected", "clipped"):  # the coordinator's decision (site_client/verdicts.py)
        verb = "REJECTED" if kind == "rejected" else "clipped"
        return f"{head}: update {verb} by the coordinator: {event.get('why', 'no reason given')}"
    return f"{head}: FAILED: {event.get('why', 'see the log')} (details in STATE/logs)"


def _run_once(cmd: list[str], env: dict[str, str], state: Path, log_path: Path,
              progress: SiteProgress | None = None,
              on_tick: Callable[[], object] | None = None) -> tuple[int, str]:
    """One SuperNode process until it exits (or gives up reconnecting); (exit code, its output).

    ``on_tick`` runs every second meanwhile (the warm worker's supervision).
    """
    start = log_path.stat().st_size if log_path.exists() else 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=state,
                            start_new_session=True)
    copier = threading.Thread(target=_copy_output, args=(proc.stdout, log_path), daemon=True)
    copier.start()
    (state / "supernode.pid").write_text(str(proc.pid))
    try:
        while True:
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if progress is not None:
                progress.poll(start)
            if on_tick is not None:
                on_tick()
            if any(g in _read_from(log_path, start) for g in GAVE_UP):
                try:  # give it a moment to exit by itself, then end it ourselves
                    code = proc.wait(timeout=5.0) or 1
                except subprocess.TimeoutExpired:
                    code = 1
                break
    finally:
        # SIGTERM the SuperNode, then whatever of its session (SuperExec, orphaned
        # flwr-clientapp processes) is left; SIGKILL after the grace period.
        terminate_pids([proc.pid], grace_s=5.0)
        (state / "supernode.pid").unlink(missing_ok=True)
        copier.join(timeout=5.0)
        if progress is not None:
            progress.poll(start)
    return code, _read_from(log_path, start)


def _until_reachable(superlink: str, ca: Path, waiting: CoordinatorWait,
                     reach: Reach | None = None) -> None:
    """Return once the coordinator answers the probe; sleep with backoff meanwhile.

    Raises:
        SiteError: a certain cause (before the first connection, or a certificate at any
            time), or ``connect_timeout_s`` spent before the first connection.
    """
    while True:
        reach = reach or probe_coordinator(superlink, ca)
        if reach.ok:
            return
        if reach.certain and not (reach.kind == "no-such-name" and waiting.ever_connected):
            raise reach_error(reach, superlink)
        cause = reach.detail if reach.kind == "waiting" else \
            f"the name {split_address(superlink)[0]!r} cannot be resolved ({reach.detail})"
        if waiting.expired():
            raise SiteError(_unreachable(superlink, cause), EXIT_UNREACHABLE)
        time.sleep(waiting.next_delay(cause))
        reach = None


def run_supernode(
    kit: SiteKit,
    data: Path,
    superlink: str | None = None,
    state_dir: Path | None = None,
    clientapp_port: int | None = None,
    privacy: PrivacyConfig | None = None,
    runtime: Runtime | None = None,
    warm_worker: bool = True,
) -> int:
    """Run the site's SuperNode until we are stopped; returns the exit code.

    With ``warm_worker`` (the default) a long-lived worker process runs every round's work
    (:mod:`site_client.worker`): started before the SuperNode, restarted within ~2 s if it dies,
    stopped with the command.

    ``privacy`` (from :func:`site_privacy_settings`; default: site.yaml's section alone) is
    written into the node config, so every ClientApp process of this site trains under it.

    The site outlives the coordinator's runs. A SuperNode that loses a coordinator it was
    connected to (the run ended, the coordinator restarted, the network dropped) is started
    again once the coordinator answers, with backoff (site_client/coordinator_wait.py), until
    the site is stopped. What ends the command: a stop; a certain cause found by the probe
    before any SuperNode (a name that does not resolve, a certificate that does not match); a
    refusal (key not registered); ``connect_timeout_s`` spent before the first connection.

    Raises:
        SiteError: the SuperNode was refused or could not connect (message and code say which).
    """
    superlink = superlink or kit.settings.superlink
    state = (state_dir or (kit.root / kit.settings.state_dir)).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    if privacy is None:
        privacy = site_privacy_settings(kit)
    node_config = state / "node-config.toml"
    config = site_node_config(kit, data, state, privacy, runtime)
    if warm_worker:  # the ClientApp hands every round to it (site_client/worker.py)
        config[NODE_WORKER_SOCKET] = str(state / "worker.sock")
    node_config.write_bytes(tomli_w.dumps(config).encode())
    if privacy.enabled:
        log.info("site %s: differential privacy on (epsilon %g, delta %g, clip %g); budget "
                 "ledger in %s", kit.settings.site_name, privacy.target_epsilon,
                 privacy.target_delta, privacy.max_grad_norm, state)
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_HOME": str(state / ".flwr"), "PYTHONUNBUFFERED": "1"})
    env.setdefault("OMP_NUM_THREADS", "1")
    # Flower's only timing setting (docs/flower.md, "Timing"): how often the SuperExec that the
    # SuperNode starts asks it for a task. Its default, 1 s, adds 0.5 s to every round on
    # average; 0.2 s costs five local calls a second (docs/benchmarks.md, "Rounds at the speed of
    # the network").
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    # The SuperNode spawns flower-superexec and flwr-clientapp by name: this venv's come first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # the SuperNode retries a lost coordinator this long by itself before this command takes
    # over (probe, then backoff); it also bounds a SuperNode that cannot get through after the
    # probe did
    cmd = supernode_command(kit, superlink, node_config, clientapp_port or free_port(),
                            kit.settings.reconnect_grace_s)
    log_path = logs / "supernode.log"
    site = kit.settings.site_name
    progress = SiteProgress(site, superlink, state, log_path)
    waiting = CoordinatorWait(site, superlink, kit.settings.connect_timeout_s, progress.say)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    worker = WorkerProcess(state, env) if warm_worker else None
    try:
        reach: Reach | None = probe_coordinator(superlink, kit.ca)
        if reach.certain:  # before the worker imports torch: the answer comes in seconds
            raise reach_error(reach, superlink)
        if worker is not None:
            worker.start()
            log.info("site %s: warm worker started (log: %s)", site, logs / "worker.log")
        refused_after_run = False
        while True:
            _until_reachable(superlink, kit.ca, waiting, reach)
            reach = None
            log.info("site %s: SuperNode starting, connecting to %s; log: %s", site, superlink,
                     log_path)
            progress.reset()
            code, text = _run_once(cmd, env, state, log_path, progress,
                                   worker.check if worker is not None else None)
            if CONNECTED in text:
                # Whatever ended a connected SuperNode (Flower may exit 0, "terminated
                # gracefully", after giving up), the coordinator went away: an operator's stop
                # reaches this process as a signal instead.
                waiting.connected()
                waiting.coordinator_gone()
                refused_after_run = False
                continue
            if code == 0:
                return 0
            found = diagnose_supernode_log(text, site, superlink)
            if found is not None and found[1] == EXIT_REFUSED and waiting.ever_connected \
                    and not refused_after_run:
                # a coordinator starting its next run registers the sites' keys just after its
                # SuperLink answers: one refusal in that gap is not yet a verdict
                refused_after_run = True
                time.sleep(waiting.next_delay("refused; it may still be registering its sites"))
                continue
            if found is not None and found[1] != EXIT_UNREACHABLE:
                raise SiteError(found[0], found[1])
            if found is None:
                raise SiteError(f"the SuperNode exited with code {code}; see {log_path}", 1)
            if waiting.expired():
                raise SiteError(found[0], EXIT_UNREACHABLE)
            # the probe got through but the SuperNode did not: try again after a while
            time.sleep(waiting.next_delay(f"the SuperNode could not connect; see {log_path}"))
    except (KeyboardInterrupt, SystemExit):
        log.info("site %s: stopping (signal)", site)
        return 0
    finally:
        if worker is not None:
            worker.stop()
        for s, h in old.items():
            signal.signal(s, h)
