"""The plain-data request and reply of one round at a site (numpy arrays, numbers, short text).

They cross the site's local worker socket (:mod:`site_client.worker`), so this module imports
neither torch nor Flower: the ClientApp shim that builds them stays quick to start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RoundRequest", "RoundReply"]


@dataclass
class RoundRequest:
    """One message for the site: its kind, where it runs, the instruction and the wire arrays."""

    kind: str  # exchange.TRAIN | exchange.EVALUATE
    run_id: int
    node_id: int
    node_config: dict[str, Any]
    config: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclass
class RoundReply:
    """What goes back: metrics and arrays (and q8 scales), or an error code with a fixed text."""

    metrics: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] | None = None
    scales: dict[str, np.ndarray] | None = None
    site_name: str | None = None
    error: tuple[int, str] | None = None

    @classmethod
    def failed(cls, code: int, text: str) -> RoundReply:
        return cls(error=(code, text))
