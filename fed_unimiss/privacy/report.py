"""What a DP site says about privacy in its reply: the shared vocabulary of both sides.

A DP site's train reply carries ``epsilon`` (spent so far, per patient, at its delta),
``epsilon_budget`` (its target) and ``dp_delta`` (its delta): settings, not computed from data. A site whose budget would be
exceeded replies metrics only: ``dp_refused = 1``, ``epsilon`` and ``epsilon_budget``, no state.
Numbers only; the aggregator records them per site in rounds.jsonl (``epsilon``).

A federation whose config sets ``require_dp: true`` stamps :data:`REQUIRE_DP` into every train
instruction; a site without DP then refuses with error :data:`ERROR_DP_REQUIRED` (fixed text)
instead of releasing a non-private update, and the aggregator turns any non-error train reply
that carries no ``epsilon`` into the same error (a site running code that ignores the flag).
Neither side can *prove* DP: the aggregator trusts the site's report (docs/privacy.md).

Every train instruction also announces the DP plan (:data:`DP_PLAN_PATIENTS_PER_STEP`): a DP
site checks its settings against it before spending budget and adopts it, or refuses with
:data:`ERROR_DP_PLAN`, naming on its own terminal each value that differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["EPSILON", "EPSILON_BUDGET", "DELTA", "DP_REFUSED", "REQUIRE_DP", "ERROR_DP_REQUIRED",
           "DP_PLAN_PATIENTS_PER_STEP", "ERROR_DP_PLAN", "privacy_refusal", "reported_epsilon",
           "reported_budget", "reported_delta"]

EPSILON = "epsilon"
EPSILON_BUDGET = "epsilon_budget"  # the site's target epsilon (the coordinator's dashboard shows it)
# the site's delta: its epsilon holds at this delta, so a published model names both
DELTA = "dp_delta"
DP_REFUSED = "dp_refused"
# Train-instruction config key (bool): the federation accepts updates from DP sites only.
REQUIRE_DP = "require-dp"
# Error code of a reply refused (by a non-DP site, or by the aggregator for it) under REQUIRE_DP.
ERROR_DP_REQUIRED = 5103
# Train-instruction config key (float): the federation's announced DP plan, the largest expected
# patients per step a DP reply may be trained with. The aggregator bounds a DP reply's counts by
# it; a DP site whose own setting is larger adopts it or refuses before it spends any budget.
DP_PLAN_PATIENTS_PER_STEP = "dp-plan-patients-per-step"
# Error code of a DP site that refuses a round, before training, because its settings do not fit
# the announced plan (an update it trained would be rejected: no budget is spent on it).
ERROR_DP_PLAN = 5105


def privacy_refusal(metrics: Mapping[str, Any] | None) -> float | None:
    """Epsilon spent if ``metrics`` is a budget refusal, else None (also for malformed values)."""
    if metrics is None or metrics.get(DP_REFUSED) != 1:
        return None
    eps = _finite(metrics, EPSILON)
    return float("nan") if eps is None else eps


def _finite(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    """``metrics[key]`` as a float if it is a finite number (not a bool), else None."""
    value = None if metrics is None else metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def reported_epsilon(metrics: Mapping[str, Any] | None) -> float | None:
    """The finite ``epsilon`` a DP site reported in ``metrics``, or None (no DP report)."""
    return _finite(metrics, EPSILON)


def reported_budget(metrics: Mapping[str, Any] | None) -> float | None:
    """The finite, positive ``epsilon_budget`` a DP site reported in ``metrics``, or None."""
    value = _finite(metrics, EPSILON_BUDGET)
    return value if value is not None and value > 0 else None


def reported_delta(metrics: Mapping[str, Any] | None) -> float | None:
    """The ``dp_delta`` a DP site reported in ``metrics`` (in (0, 1)), or None."""
    value = _finite(metrics, DELTA)
    return value if value is not None and 0 < value < 1 else None
