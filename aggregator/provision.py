"""Provisioning: the consortium CA, the coordinator's TLS identity and one key pair per site.

``provision(sites, out)`` writes one folder per party so that each can be handed over as it is::

    KITS/authority/    ca.key, ca.crt            the consortium CA; keep offline, never distribute
    KITS/coordinator/  ca.crt, server.crt, server.key, site-keys/<site>.pub, coordinator.yaml,
                       federation.yaml (a template for ``aggregator start --config``),
                       roster/<site>.pub
    KITS/site-<name>/  ca.crt, site.key, site.pub, site.yaml, roster/<site>.pub

Why this shape: the SuperLink needs a TLS certificate whose SANs cover every name it is dialled by
(the sites' --superlink host, and 127.0.0.1 for its own SuperExec, see docs/flower.md, "Ports and
TLS"), and SuperNode authentication needs one NIST EC key pair per site in OpenSSH format, whose
public half is registered at the SuperLink. A site's kit holds only the CA certificate (to verify
the coordinator) and its own private key; the coordinator's kit holds only public site keys.

``roster/`` holds every site's identity PUBLIC key (the same keys as ``site-keys/``), in every
kit: under ``exchange.up: secure`` each site signs its per-round keys with ``site.key`` and checks
every other site's signature against its roster, so the aggregator cannot slip in keys of its
own (fed_unimiss/secure_aggregation/keys.py). ``--add-sites`` rewrites the roster of every kit
it can reach; kits already handed out need the new ``roster/`` too (docs/privacy.md).

Private keys are written 0600 and kit folders 0700. An existing kit is never overwritten: the
coordinator would otherwise silently invalidate every site's key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fed_unimiss.checkpoint import atomic_write_bytes

__all__ = [
    "add_sites",
    "ProvisionError",
    "KitPaths",
    "provision",
    "site_kit_dir",
    "validate_site_name",
    "DEFAULT_FLEET_PORT",
    "DEFAULT_CONTROL_PORT",
    "ROSTER",
    "refresh_rosters",
]

log = logging.getLogger(__name__)

DEFAULT_FLEET_PORT = 9092  # gRPC Fleet API: the only port sites connect to
DEFAULT_CONTROL_PORT = 9093  # HTTPS Control/Runtime API: stays on the coordinator's loopback
CERT_DAYS = 825  # two years and a bit: long enough for a pretraining campaign
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
_CURVE = ec.SECP384R1  # Flower requires a NIST curve for SuperNode keys
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROSTER = "roster"  # in every kit: <site>.pub of every site (keys.load_roster reads it)


class ProvisionError(ValueError):
    """Provisioning input a person has to fix (bad site name, existing kit, ...)."""


@dataclass(frozen=True)
class KitPaths:
    """Where ``provision`` put everything (returned so callers and tests need not guess)."""

    root: Path
    authority: Path
    coordinator: Path
    sites: dict[str, Path]


def validate_site_name(name: str) -> str:
    """Site names end up in folder names, node config and logs: keep them boring."""
    if not _SITE_NAME.match(name):
        raise ProvisionError(
            f"site name {name!r} is not allowed: use 1-40 letters, digits, '-' or '_', "
            "starting with a letter or digit (e.g. 'A', 'charite', 'site_03')"
        )
    return name


def site_kit_dir(out: Path, site: str) -> Path:
    return out / f"site-{site}"


def refresh_rosters(out: Path) -> list[Path]:
    """Write ``roster/`` (every site's public key, from ``coordinator/site-keys/``) into the
    coordinator kit and every site kit under ``out``; returns the rosters written.

    A roster is rewritten whole (stale keys of removed sites go), one file at a time.
    """
    coordinator = out / "coordinator"
    keys = {p.name: p.read_bytes() for p in sorted((coordinator / "site-keys").glob("*.pub"))}
    kits = [coordinator] + sorted(p for p in out.glob("site-*") if (p / "site.key").is_file())
    written = []
    for kit in kits:
        roster = kit / ROSTER
        roster.mkdir(mode=0o755, exist_ok=True)
        for old in roster.glob("*.pub"):
            if old.name not in keys:
                old.unlink()
        for name, data in keys.items():
            atomic_write_bytes(roster / name, data)
        written.append(roster)
    return written


# ---------------------------------------------------------------- key and certificate helpers


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fed-unimiss consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS + 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _san_entries(server_names: list[str]) -> list[x509.GeneralName]:
    """DNS or IP SANs for every name, always including localhost and 127.0.0.1.

    127.0.0.1 is not optional: the SuperLink's own SuperExec dials the Runtime API on it and
    crashes on a mismatch, leaving runs pending forever (docs/flower.md, "Ports and TLS").
    """
    names = list(dict.fromkeys([*server_names, "localhost", "127.0.0.1"]))
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return entries


def _make_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_names: list[str],
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(server_names[0] if server_names else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(server_names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def _ssh_public(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return pub + f" {comment}\n".encode()


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _mkdir_private(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


# ---------------------------------------------------------------- config templates


def _coordinator_yaml(server_names: list[str], sites: list[str], fleet_port: int) -> str:
    site_lines = "\n".join(f"  {s}: site-keys/{s}.pub" for s in sites)
    return f"""\
# Coordinator deployment settings, read by `fed-unimiss aggregator start --kit THIS_FOLDER`.
# Generated by `fed-unimiss provision`; edit addresses here, never the keys.

# Where the SuperLink listens for sites (gRPC + TLS). Sites dial one of server_names at this port;
# open it (inbound TCP) in the coordinator's firewall. 0.0.0.0 = all interfaces.
fleet_address: "0.0.0.0:{fleet_port}"
# Control/Runtime API (HTTPS). Used only by the aggregator process itself: keep it on loopback.
control_address: "127.0.0.1:{DEFAULT_CONTROL_PORT}"
# Names in the TLS certificate (plus localhost and 127.0.0.1), informational.
server_names: [{", ".join(repr(n) for n in server_names)}]
# Site name -> public key (relative to this folder). Only these sites may connect.
sites:
{site_lines}
"""


def _site_yaml(site: str, superlink: str) -> str:
    return f"""\
# Site settings, read by `fed-unimiss site start --kit THIS_FOLDER --data DIR`.
# Generated by `fed-unimiss provision` for site {site!r}.

site_name: "{site}"
# The coordinator's Fleet address (host:port). Only outbound TCP to it is needed.
superlink: "{superlink}"
# Where the site keeps its own state (logs, data index cache, DP accountant). Relative paths are
# relative to this folder. Override with --state-dir.
state_dir: "state"
# Seconds to keep trying to reach the coordinator at start-up before giving up with exit code
# 3; 0 = until stopped. Once connected, the site outlives the coordinator's runs: it waits for
# the next one until stopped. A name that does not resolve, or a certificate that does not
# match, ends it at once.
connect_timeout_s: 0
# Seconds the site keeps retrying a coordinator it lost before it decides the run ended and
# waits for the next one (1-3600).
reconnect_grace_s: 30
# Where this site trains (docs/site-guide.md, "Hardware"); `site start --device/--precision/
# --workers` override these.
device: auto        # auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps
precision: fp32     # fp32, or bf16/fp16 forward passes with fp32 weights (DP sites: fp32)
workers: 1          # data-parallel processes per round, one GPU each on CUDA (DP sites: 1)
# A small labelled set the site probes the global model on when the federation asks
# (docs/site-guide.md, "A probe set"): only balanced accuracies leave the site. null = none;
# e.g. probe: {{data: /data/probe-set, task: seg3d}}
probe: null
# Differential privacy (docs/privacy.md): off unless enabled here or with
# `site start --dp-epsilon E` (the --dp-* flags override these values). The guarantee is
# (target_epsilon, target_delta)-DP per patient at this site, over the whole federation; once
# spent, the site refuses further rounds. Fields: fed_unimiss/privacy/config.py.
privacy:
  enabled: false
  target_epsilon: 8.0       # total budget per patient; smaller = more private, more noise
  target_delta: 1.0e-5      # keep well below 1 / number of patients
  max_grad_norm: 1.0        # per-patient L2 gradient clip
  planned_rounds: 10        # rounds the budget is calibrated for
  patients_per_step: 4.0    # expected patients per DP step
  adopt_plan: true          # federation plans fewer patients per step: train with its value
                            # (each round costs less epsilon) or, with false, refuse the round
"""


def _federation_template() -> str:
    """The repository's micro federation config with its recipe path made absolute.

    A starting point for ``aggregator start --config``; copy and edit it for a real campaign
    (recipe, local_steps, min_sites, round_timeout).
    """
    src = REPO_CONFIGS / "federation" / "micro.yaml"
    header = ("# Federation template written by `fed-unimiss provision` from "
              f"{src}.\n# Fields: fed_unimiss/federation.py (FederationConfig).\n")
    try:
        text = src.read_text()
    except OSError:
        text = "recipe: ../pretrain/micro.yaml\nlocal_steps: 4\nmin_sites: 2\nround_timeout: 600\n"
    recipe_dir = (REPO_CONFIGS / "federation").resolve()

    def absolute(m: re.Match) -> str:
        value = m.group(2).strip().strip("'\"")
        path = Path(value) if Path(value).is_absolute() else (recipe_dir / value).resolve()
        return f'{m.group(1)}"{path}"'

    return header + re.sub(r"^(recipe:\s*)(\S+)", absolute, text, count=1, flags=re.M)


# ---------------------------------------------------------------- provisioning


def _check_new(out: Path, names: list[str]) -> None:
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise ProvisionError(
            f"{out}: refusing to overwrite existing kit folder(s) {', '.join(existing)}; "
            "re-provisioning would invalidate keys already handed out. Use a new --out folder, "
            "or delete those folders first if you really mean to replace them."
        )


def provision(
    sites: list[str],
    out: str | Path,
    server_names: list[str] | None = None,
    fleet_port: int = DEFAULT_FLEET_PORT,
) -> KitPaths:
    """Create the CA, the coordinator's TLS identity, one key pair per site and all kits.

    Args:
        sites: site names (unique, see :func:`validate_site_name`).
        out: the kits root; must not already hold any of the folders written here.
        server_names: DNS names or IPs the sites will dial; localhost and 127.0.0.1 are added.
        fleet_port: the Fleet port written into the site templates.

    Raises:
        ProvisionError: bad or duplicate site names, or an existing kit in ``out``.
    """
    out = Path(out).expanduser().resolve()
    server_names = [n.strip() for n in (server_names or []) if n.strip()]
    if not sites:
        raise ProvisionError("--sites: give at least one site name, e.g. --sites A,B,C")
    for s in sites:
        validate_site_name(s)
    dupes = sorted({s for s in sites if sites.count(s) > 1})
    if dupes:
        raise ProvisionError(f"--sites: duplicate site name(s) {', '.join(dupes)}")
    folders = ["authority", "coordinator", *(site_kit_dir(out, s).name for s in sites)]
    _check_new(out, folders)
    out.mkdir(parents=True, exist_ok=True)

    # ---- consortium CA and coordinator TLS identity
    ca_key = _new_key()
    ca_cert = _make_ca(ca_key, "fed-unimiss consortium CA")
    server_key = _new_key()
    server_cert = _make_server_cert(server_key, ca_key, ca_cert, server_names)
    authority = _mkdir_private(out / "authority")
    atomic_write_bytes(authority / "ca.key", _pem_key(ca_key), mode=0o600)
    atomic_write_bytes(authority / "ca.crt", _cert_pem(ca_cert))

    coordinator = _mkdir_private(out / "coordinator")
    atomic_write_bytes(coordinator / "ca.crt", _cert_pem(ca_cert))
    atomic_write_bytes(coordinator / "server.crt", _cert_pem(server_cert))
    atomic_write_bytes(coordinator / "server.key", _pem_key(server_key), mode=0o600)

    # ---- one key pair per site
    dial = server_names[0] if server_names else "127.0.0.1"
    site_dirs: dict[str, Path] = {}
    for s in sites:
        key = _new_key()
        kit = _mkdir_private(site_kit_dir(out, s))
        atomic_write_bytes(kit / "ca.crt", _cert_pem(ca_cert))
        atomic_write_bytes(kit / "site.key", _ssh_private(key), mode=0o600)
        atomic_write_bytes(kit / "site.pub", _ssh_public(key, f"fed-unimiss-site-{s}"))
        atomic_write_bytes(kit / "site.yaml", _site_yaml(s, f"{dial}:{fleet_port}").encode())
        atomic_write_bytes(
            coordinator / "site-keys" / f"{s}.pub", _ssh_public(key, f"fed-unimiss-site-{s}")
        )
        site_dirs[s] = kit
    atomic_write_bytes(coordinator / "federation.yaml", _federation_template().encode())
    atomic_write_bytes(
        coordinator / "coordinator.yaml",
        _coordinator_yaml(server_names, sites, fleet_port).encode(),
    )
    refresh_rosters(out)
    log.info("provisioned %d site kit(s) and the coordinator kit in %s", len(sites), out)
    return KitPaths(root=out, authority=authority, coordinator=coordinator, sites=site_dirs)


def add_sites(sites: list[str], out: str | Path) -> KitPaths:
    """Add site kits to an existing provisioning (``provision --add-sites``).

    Each new site gets its own key pair and a kit with the consortium's ``ca.crt``; its public
    key goes into ``coordinator/site-keys/`` and the ``sites:`` list of ``coordinator.yaml``
    (the rest of that file, addresses included, is kept as edited). The CA key is not needed:
    sites authenticate by their registered key, not by a certificate. The next ``aggregator
    start`` registers the new keys; a run already going does not see them.

    Raises:
        ProvisionError: ``out`` holds no coordinator kit, or a name is bad or already taken.
    """
    import yaml

    out = Path(out).expanduser().resolve()
    coordinator = out / "coordinator"
    settings_file = coordinator / "coordinator.yaml"
    if not settings_file.is_file() or not (coordinator / "ca.crt").is_file():
        raise ProvisionError(f"--out {out}: no coordinator kit (coordinator/coordinator.yaml and "
                             "ca.crt) to add sites to; run `fed-unimiss provision` first")
    if not sites:
        raise ProvisionError("--add-sites: give at least one site name, e.g. --add-sites D")
    text = settings_file.read_text()
    settings = yaml.safe_load(text) or {}
    known = dict(settings.get("sites") or {})
    for s in sites:
        validate_site_name(s)
    taken = sorted({s for s in sites if s in known or sites.count(s) > 1})
    if taken:
        raise ProvisionError(f"--add-sites: site name(s) {', '.join(taken)} already provisioned "
                             "or given twice; a site that lost its kit needs a new name")
    _check_new(out, [site_kit_dir(out, s).name for s in sites])
    ca_pem = (coordinator / "ca.crt").read_bytes()
    names = [n for n in settings.get("server_names") or [] if n]
    port = split_fleet_port(str(settings.get("fleet_address", f"0.0.0.0:{DEFAULT_FLEET_PORT}")))
    dial = names[0] if names else "127.0.0.1"
    site_dirs: dict[str, Path] = {}
    lines = []
    for s in sites:
        key = _new_key()
        kit = _mkdir_private(site_kit_dir(out, s))
        atomic_write_bytes(kit / "ca.crt", ca_pem)
        atomic_write_bytes(kit / "site.key", _ssh_private(key), mode=0o600)
        atomic_write_bytes(kit / "site.pub", _ssh_public(key, f"fed-unimiss-site-{s}"))
        atomic_write_bytes(kit / "site.yaml", _site_yaml(s, f"{dial}:{port}").encode())
        atomic_write_bytes(coordinator / "site-keys" / f"{s}.pub",
                           _ssh_public(key, f"fed-unimiss-site-{s}"))
        lines.append(f"  {s}: site-keys/{s}.pub")
        site_dirs[s] = kit
    # the sites: list is the file's last section (as provision writes it): append to it
    atomic_write_bytes(settings_file, (text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
                       .encode())
    if set((yaml.safe_load(settings_file.read_text()) or {}).get("sites") or {}) != \
            set(known) | set(sites):
        raise ProvisionError(f"{settings_file}: the sites: list is not the file's last section "
                             "(edited by hand?); add the new sites' lines there yourself: "
                             + "; ".join(lines))
    refresh_rosters(out)
    log.info("added %d site kit(s) to %s", len(sites), out)
    return KitPaths(root=out, authority=out / "authority", coordinator=coordinator,
                    sites=site_dirs)


def split_fleet_port(address: str) -> int:
    """The port of a HOST:PORT address (the default Fleet port if it has none)."""
    _, _, port = address.rpartition(":")
    return int(port) if port.isdigit() else DEFAULT_FLEET_PORT
