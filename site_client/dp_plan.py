"""A DP site against the federation's announced DP plan, checked before any budget is spent.

Every train instruction announces the plan's largest expected patients per step
(:data:`~fed_unimiss.privacy.report.DP_PLAN_PATIENTS_PER_STEP`). The aggregator bounds a DP
reply's sample counts by it (local_steps x that value, x view_depth for 2D) and rejects a reply
above. A DP site reports counts from its own ``patients_per_step``, so a site set higher than the
plan could train, spend epsilon and still have its update rejected. Before it opens its ledger
the site therefore fits itself to the plan:

- its value is at most the plan's: it trains with its own settings (its counts fit the bound);
- it is higher and ``adopt_plan`` is on (the default): it trains with the plan's value. Fewer
  patients per step is a lower Poisson rate, so every round costs less epsilon; the site's
  target epsilon, delta, clip and ledger are its own and unchanged (the coordinator never
  raises a site's budget);
- it is higher and ``adopt_plan`` is off: it refuses the round with
  :data:`~fed_unimiss.privacy.report.ERROR_DP_PLAN`, naming each differing value on its own
  terminal; its ledger is not touched.

Nothing here is sent: the reply carries the error code and a fixed text only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fed_unimiss.privacy.config import PrivacyConfig
from fed_unimiss.privacy.report import DP_PLAN_PATIENTS_PER_STEP

__all__ = ["PlanDifference", "PlanFit", "fit_to_plan"]

SETTING = "dp-patients-per-step"  # as hospital IT writes it: --dp-patients-per-step, site.yaml's
# privacy.patients_per_step, and the federation YAML's site_privacy key


@dataclass(frozen=True)
class PlanDifference:
    """One setting of this site that the announced plan does not accept."""

    setting: str
    site: float
    plan: float

    def describe(self) -> str:
        return f"{self.setting} is {self.site:g} at this site, the plan accepts at most {self.plan:g}"


@dataclass(frozen=True)
class PlanFit:
    """What this round trains with, and how it differs from the site's own settings."""

    privacy: PrivacyConfig  # the settings to train with (the site's, or with the plan adopted)
    adopted: tuple[PlanDifference, ...] = ()  # values taken from the plan for this round
    refused: tuple[PlanDifference, ...] = ()  # values the site keeps: it refuses the round
    malformed: str | None = None  # the instruction announced a plan this site cannot read

    @property
    def refuses(self) -> bool:
        return bool(self.refused) or self.malformed is not None

    def adopted_text(self) -> str | None:
        """The site's terminal note for a round trained with the plan's values, or None."""
        if not self.adopted:
            return None
        return "adopted the federation's DP plan: " + "; ".join(
            f"{d.setting} {d.plan:g} (this site's setting: {d.site:g})" for d in self.adopted)

    def refusal_text(self) -> str:
        """Why the site refuses (its own terminal and log), naming each differing value."""
        if self.malformed is not None:
            return (f"the federation announced a DP plan this site cannot read ({self.malformed})"
                    ": refusing to train, no privacy budget spent; ask the coordinator to check "
                    "its fed-unimiss version")
        values = "; ".join(d.describe() for d in self.refused)
        fixes = " ".join(f"--{d.setting} {d.plan:g}" for d in self.refused)
        return (f"this site's DP settings do not fit the federation's announced DP plan: {values}"
                ". The coordinator would reject this round's update, so the site refuses before "
                f"training and spends no privacy budget. Restart the site with {fixes}, or set "
                "privacy.adopt_plan: true in site.yaml to train with the plan's values")


def _announced(config: Mapping[str, Any]) -> float | None:
    """The plan's patients per step; None when none is announced. ValueError when malformed."""
    value = config.get(DP_PLAN_PATIENTS_PER_STEP)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{DP_PLAN_PATIENTS_PER_STEP} = {value!r}, expected a positive number")
    return float(value)


def fit_to_plan(privacy: PrivacyConfig, config: Mapping[str, Any]) -> PlanFit:
    """This DP site's settings for the round announced in ``config`` (the instruction)."""
    try:
        plan = _announced(config)
    except ValueError as e:
        return PlanFit(privacy, malformed=str(e))
    if plan is None or privacy.patients_per_step <= plan:
        return PlanFit(privacy)
    difference = PlanDifference(SETTING, float(privacy.patients_per_step), plan)
    if not privacy.adopt_plan:
        return PlanFit(privacy, refused=(difference,))
    return PlanFit(dataclasses.replace(privacy, patients_per_step=plan), adopted=(difference,))
