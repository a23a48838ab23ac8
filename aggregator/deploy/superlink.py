"""The coordinator kit and the ``flower-superlink`` process built from it.

The SuperLink is Flower's own executable from this venv, run with TLS (the kit's CA, server
certificate and key), SuperNode authentication and runtime dependency installation disabled.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fed_unimiss.config import ConfigError, load_yaml

__all__ = [
    "CoordinatorSettings",
    "CoordinatorKit",
    "load_coordinator_kit",
    "flower_env",
    "flower_executable",
    "superlink_command",
    "split_address",
]


@dataclass(frozen=True)
class CoordinatorSettings:
    """``coordinator.yaml`` in the coordinator kit (written by ``fed-unimiss provision``)."""

    # Where the SuperLink listens for sites (gRPC + TLS); open this port to the sites.
    fleet_address: str = "0.0.0.0:9092"
    # Control/Runtime API (HTTPS), used by the aggregator command itself; keep it on loopback.
    control_address: str = "127.0.0.1:9093"
    # Names in the server certificate, informational.
    server_names: tuple[str, ...] = ()
    # Site name -> OpenSSH public key file, relative to the kit folder.
    sites: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        split_address(self.fleet_address, "fleet_address")
        host, _ = split_address(self.control_address, "control_address")
        if not self.sites:
            raise ValueError("sites: no site keys listed; provision the kit with --sites")


@dataclass(frozen=True)
class CoordinatorKit:
    """Absolute paths of everything the aggregator needs from ``KITS/coordinator``."""

    root: Path
    ca: Path
    cert: Path
    key: Path
    settings: CoordinatorSettings
    site_keys: dict[str, Path]


def split_address(address: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with an error naming ``what`` for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT (e.g. 0.0.0.0:9092), got {address!r}")
    return host.strip("[]"), int(port)


def load_coordinator_kit(kit: str | Path) -> CoordinatorKit:
    """Read and check a coordinator kit; every missing file is named in the error."""
    root = Path(kit).expanduser().resolve()
    settings_file = root / "coordinator.yaml"
    if not settings_file.is_file():
        raise ConfigError(f"{root}: not a coordinator kit (no coordinator.yaml); pass the "
                          "KITS/coordinator folder written by `fed-unimiss provision`")
    settings = load_yaml(CoordinatorSettings, settings_file)
    paths = {"ca.crt": root / "ca.crt", "server.crt": root / "server.crt",
             "server.key": root / "server.key"}
    for name, p in paths.items():
        if not p.is_file():
            raise ConfigError(f"{root}: coordinator kit is missing {name}")
    site_keys = {}
    for site, rel in settings.sites.items():
        p = (root / rel).resolve()
        if not p.is_file():
            raise ConfigError(f"{settings_file}: sites.{site}: key file {p} does not exist")
        site_keys[site] = p
    return CoordinatorKit(root=root, ca=paths["ca.crt"], cert=paths["server.crt"],
                          key=paths["server.key"], settings=settings, site_keys=site_keys)


def flower_executable(name: str) -> str:
    """The path of a Flower console script in *this* venv (never one found on PATH)."""
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        raise FileNotFoundError(f"{exe} not found: is flwr installed in this environment?")
    return str(exe)


def flower_env(flwr_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: no telemetry, no update check, no ``uv sync``.

    ``FLWR_HOME`` is private to the run (or the site's state dir) so nothing lands in ~/.flwr.
    """
    env = dict(os.environ if base is None else base)
    env.update({
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(flwr_home),
        "PYTHONUNBUFFERED": "1",
    })
    # Flower spawns flower-superexec / flwr-serverapp / flwr-clientapp by name: this venv first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Keep each Flower process (and the training in its app processes) from using every core.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def superlink_command(
    kit: CoordinatorKit, fleet_address: str, control_address: str, database: Path | None = None
) -> list[str]:
    """The SuperLink command line.

    The state database stays in memory by default: with a SQLite file, a SuperLink under CPU
    contention was seen failing requests with "database is locked" and killing the run. Site
    keys are re-registered on every start instead (idempotent), and resuming is the
    ServerApp's job (from RUN), so nothing is lost.
    """
    host, port = split_address(control_address, "control address")
    db = ["--database", str(database)] if database is not None else []
    return [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(kit.ca),
        "--ssl-certfile", str(kit.cert),
        "--ssl-keyfile", str(kit.key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--fleet-api-type", "grpc-rere",
        "--fleet-api-address", fleet_address,
        "--host", host,
        "--port", str(port),
        *db,
    ]
