"""The Flower App Bundle (FAB) for a run, built in memory from a generated ``pyproject.toml``.

The ServerApp and ClientApp are the *installed* ``fed-unimiss`` package at every party, so the FAB
carries no code at all: only a ``pyproject.toml`` naming the components and the run-config
defaults, and a LICENSE (fab-format-version 1 requires one). This keeps repository files (and
anything a developer left lying around in the checkout) out of what is sent to sites, and keeps
the bundle ~1 kB. Runtime dependency installation must be off everywhere, since the bundle's
dependencies are already installed (docs/flower.md, "Runtime dependency installation").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import flwr
import tomli_w

from flower_layer.fab_build import build_fab_bytes

__all__ = ["FabSpec", "build_fab", "SERVERAPP", "CLIENTAPP", "IN_PROCESS_SESSIONS", "APP_NAME"]

SERVERAPP = "aggregator.server_app:app"
CLIENTAPP = "site_client.client_app:app"
# The memory of the sites a process runs without a worker (``simulate``): the attack grid
# reaches a simulated attacker's own secure-round state through it, as code at that site could.
IN_PROCESS_SESSIONS = "site_client.client_app:in_process_sessions"
APP_NAME = "fed-unimiss-federation"
_LICENSE = b"Apache License 2.0, see the fed-unimiss package this bundle refers to.\n"


@dataclass(frozen=True)
class FabSpec:
    """What goes into the generated pyproject: components and run-config defaults."""

    run_config: dict[str, Any]
    serverapp: str = SERVERAPP
    clientapp: str = CLIENTAPP
    version: str = "0.1.0"


def _pyproject(spec: FabSpec) -> dict[str, Any]:
    major, minor = flwr.__version__.split(".")[:2]
    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": spec.version,
            "description": "fed-unimiss federated pretraining (components from the installed package)",
            "license": {"file": "LICENSE"},
            # Every peer must run the same major.minor; the app itself is preinstalled.
            "dependencies": [f"flwr>={major}.{minor},<{major}.{int(minor) + 1}"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fed-unimiss",
                    "fab-format-version": 1,
                    "flwr-version-target": flwr.__version__,
                    "components": {"serverapp": spec.serverapp, "clientapp": spec.clientapp},
                    "config": dict(spec.run_config),
                }
            }
        },
    }


def build_fab(spec: FabSpec) -> tuple[bytes, str]:
    """Return the FAB bytes and their sha256 hex digest.

    Raises:
        ValueError: Flower rejected the generated configuration (the message says which key).
    """
    files = {
        "pyproject.toml": tomli_w.dumps(_pyproject(spec)).encode(),
        "LICENSE": _LICENSE,
    }
    fab = build_fab_bytes(files)
    return fab, hashlib.sha256(fab).hexdigest()
