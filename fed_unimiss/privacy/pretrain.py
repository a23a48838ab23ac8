"""Differential privacy for centralized / single-site pretraining (``fed-unimiss pretrain --dp-*``).

A single-site DP run spends the same per-patient budget as a federated site, so it uses the same
ledger: every checkpoint interval of ``checkpoint_every`` steps is one "round" that is planned
against the ledger before it trains and committed (persisted) before its checkpoint is written.
The budget is calibrated over the whole run (``planned_rounds`` = number of checkpoint intervals),
and the ledger lives in ``RUN/state`` so ``--resume`` keeps counting from what was spent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from fed_unimiss.privacy.config import PrivacyConfig
from fed_unimiss.privacy.ledger import PrivacyLedger, RoundPlan
from fed_unimiss.privacy.trainer import DPSelfDistillation, check_dp_recipe, site_sample_rate
from fed_unimiss.ssl.config import Recipe
from fed_unimiss.ssl.site_data import SiteData

__all__ = ["DPPretrain"]

log = logging.getLogger(__name__)


class DPPretrain:
    """The ledger and the DP engine of one pretraining run."""

    def __init__(self, privacy: PrivacyConfig, run: Path, recipe: Recipe, data: SiteData,
                 total_steps: int) -> None:
        check_dp_recipe(recipe)
        every = recipe.ssl.checkpoint_every
        self.privacy = dataclasses.replace(
            privacy, enabled=True, planned_rounds=max(1, math.ceil(total_steps / every)))
        self.ledger = PrivacyLedger.open(Path(run) / "state", self.privacy)
        self.sample_rate = site_sample_rate(self.privacy, data)
        self.noise_multiplier = self.ledger.resolve_noise_multiplier(self.sample_rate, every)
        self.engine = DPSelfDistillation(recipe, total_steps, self.privacy, self.noise_multiplier)
        self._plan: RoundPlan | None = None

    def allow(self, start_step: int, steps: int) -> str | None:
        """Plan the interval starting at ``start_step``; the refusal message, or None if allowed."""
        interval = start_step // self.privacy_interval + 1
        plan = self.ledger.plan(interval, steps, self.sample_rate)
        if not plan.allowed:
            self.ledger.record_refusal(plan)
            return plan.message
        self._plan = plan
        log.info("%s", plan.message)
        return None

    def commit(self) -> float:
        """Record the interval just trained (persisted); epsilon spent so far."""
        if self._plan is None:
            raise RuntimeError("commit() without an allowed plan")
        epsilon, self._plan = self.ledger.commit(self._plan), None
        return epsilon

    @property
    def privacy_interval(self) -> int:
        return self.engine.cfg.checkpoint_every

    def epsilon(self) -> float:
        return self.ledger.epsilon()
