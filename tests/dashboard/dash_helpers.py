"""Helpers of the dashboard tests: real ``simulate`` commands, a served dashboard, plain GETs."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FED_UNIMISS = Path(sys.executable).with_name("fed-unimiss")


def federation_config(tmp: Path, **overrides: object) -> Path:
    """configs/federation/micro-dp.yaml without its site_privacy (DP is turned on per site)."""
    import yaml

    body = yaml.safe_load((REPO / "configs" / "federation" / "micro-dp.yaml").read_text())
    body.pop("site_privacy")
    body["recipe"] = str(REPO / "configs" / "pretrain" / "micro.yaml")
    body.update(overrides)
    path = tmp / "federation.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def simulate_command(config: Path, sites: dict[str, Path], rounds: int, out: Path,
                     dp_site: str | None = None) -> list[str]:
    """The ``fed-unimiss simulate`` command line; ``dp_site``'s budget lasts 2 rounds."""
    cmd = [str(FED_UNIMISS), "simulate", "--config", str(config), "--rounds", str(rounds),
           "--out", str(out)]
    for name, folder in sites.items():
        cmd += ["--site", f"{name}={folder}"]
    if dp_site:
        cmd += ["--dp-epsilon", f"{dp_site}=8", "--dp-planned-rounds", f"{dp_site}=2",
                "--dp-patients-per-step", f"{dp_site}=2"]
    return cmd


def simulate_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@contextmanager
def serving(out: Path, address: str = "127.0.0.1:0", token: str | None = None,
            refresh_s: float = 0.5) -> Iterator[Any]:
    """The real dashboard server over ``out`` in a thread, on a port the OS picks."""
    from aggregator.dashboard.server import DashboardConfig, DashboardServer

    server = DashboardServer(DashboardConfig.make(out, address, token, refresh_s))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET; 4xx/5xx are returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
