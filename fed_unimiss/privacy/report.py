"""What a DP site says about privacy in its reply: the shared vocabulary of both sides.

A DP site's train reply carries ``epsilon`` (spent so far, per patient, at its delta). A site
whose budget would be exceeded replies metrics only: ``dp_refused = 1`` and ``epsilon``, no state.
Numbers only; the aggregator records them per site in rounds.jsonl (``epsilon``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["EPSILON", "DP_REFUSED", "privacy_refusal"]

EPSILON = "epsilon"
DP_REFUSED = "dp_refused"


def privacy_refusal(metrics: Mapping[str, Any] | None) -> float | None:
    """Epsilon spent if ``metrics`` is a budget refusal, else None (also for malformed values)."""
    if metrics is None or metrics.get(DP_REFUSED) != 1:
        return None
    eps = metrics.get(EPSILON)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        return float("nan")
    return float(eps)
