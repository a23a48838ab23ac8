"""``run_local``: one stretch of local training under a budget guard, for every caller.

Centralized pretraining calls it once per checkpoint interval, the site's ClientApp once per
round (and so does ``simulate``, which runs the real ClientApp). What differs between a plain and
a DP run is chosen once, by :func:`training_mode`:

- the engine's gradient step (:class:`~fed_unimiss.ssl.gradient_step.PlainStep` or
  :class:`~fed_unimiss.ssl.dp_step.DPStep`);
- the budget guard around each stretch: :class:`NoBudget`, or :class:`LedgerGuard`, the privacy
  ledger's plan -> refuse or train -> commit (the ledger is persisted before anything trained is
  released, so a crash in between releases nothing and loses nothing).

The result carries the metrics that may leave the site (:attr:`LocalRun.public`): for a plain
run the trainer's counts and summary metrics; for a DP run only counts derived from the public
schedule and config, and the epsilon spent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fed_unimiss.privacy.config import PrivacyConfig
from fed_unimiss.privacy.ledger import PrivacyLedger, RoundPlan
from fed_unimiss.privacy.report import DELTA, DP_REFUSED, EPSILON, EPSILON_BUDGET
from fed_unimiss.ssl.config import Recipe
from fed_unimiss.ssl.engine import SelfDistillation, TrainStats
from fed_unimiss.ssl.gradient_step import GradientStep, PlainStep
from fed_unimiss.ssl.site_data import SiteData

__all__ = ["BudgetGuard", "NoBudget", "LedgerGuard", "LocalRun", "run_local", "training_mode",
           "with_planned_intervals"]

log = logging.getLogger(__name__)


class BudgetGuard(Protocol):
    """Plan / refuse / commit around each stretch of local training."""

    def plan(self, interval: int, steps: int) -> str | None:
        """Reserve ``steps`` steps for stretch ``interval``; the refusal message, or None."""

    def refusal_metrics(self) -> dict[str, float]:
        """What a refusing site may say (after :meth:`plan` refused)."""

    def commit(self) -> dict[str, float]:
        """Record the stretch just trained (persisted); the privacy metrics that may be released."""


class NoBudget:
    """The guard of a run without differential privacy: everything is allowed, nothing spent."""

    def plan(self, interval: int, steps: int) -> str | None:
        return None

    def refusal_metrics(self) -> dict[str, float]:
        return {}

    def commit(self) -> dict[str, float]:
        return {}


class LedgerGuard:
    """The privacy ledger in a site's (or a run's) state directory as a budget guard.

    The noise multiplier is resolved once, for stretches of ``steps_per_interval`` steps: the
    configured sigma, the one calibrated at the first DP stretch (kept in the ledger), or a new
    calibration. Opening an unreadable ledger raises :class:`~fed_unimiss.privacy.LedgerError`:
    the caller must refuse to train (fail closed).
    """

    def __init__(self, state_dir: str | Path, privacy: PrivacyConfig, sample_rate: float,
                 steps_per_interval: int) -> None:
        self.ledger = PrivacyLedger.open(state_dir, privacy)
        self.sample_rate = sample_rate
        self.noise_multiplier = self.ledger.resolve_noise_multiplier(sample_rate,
                                                                     max(steps_per_interval, 1))
        self._plan: RoundPlan | None = None
        self._refused: RoundPlan | None = None

    def plan(self, interval: int, steps: int) -> str | None:
        plan = self.ledger.plan(interval, steps, self.sample_rate)
        if not plan.allowed:
            self.ledger.record_refusal(plan)
            log.warning("%s", plan.message)
            self._refused = plan
            return plan.message
        log.info("%s", plan.message)
        self._plan = plan
        return None

    def refusal_metrics(self) -> dict[str, float]:
        if self._refused is None:
            raise RuntimeError("refusal_metrics() without a refused plan")
        return {DP_REFUSED: 1, EPSILON: self._refused.epsilon_before, **self._settings()}

    def commit(self) -> dict[str, float]:
        if self._plan is None:
            raise RuntimeError("commit() without an allowed plan")
        epsilon, self._plan = self.ledger.commit(self._plan), None
        return {EPSILON: epsilon, DP_REFUSED: 0, **self._settings()}

    def _settings(self) -> dict[str, float]:
        """The target epsilon and the delta it holds at: settings, nothing from the data."""
        config = self.ledger.config
        return {EPSILON_BUDGET: float(config.target_epsilon), DELTA: float(config.target_delta)}

    def epsilon(self) -> float:
        return self.ledger.epsilon()


def training_mode(recipe: Recipe, privacy: PrivacyConfig | None, state_dir: str | Path,
                  data: SiteData, steps_per_interval: int) -> tuple[GradientStep, BudgetGuard]:
    """The gradient step and the budget guard of a run: plain, or DP-SGD under the ledger.

    Raises ``ValueError`` if DP is asked for a recipe that cannot be trained with DP-SGD (before
    the ledger is touched), and :class:`~fed_unimiss.privacy.LedgerError` for an unreadable ledger.
    """
    if privacy is None or not privacy.enabled:
        return PlainStep(), NoBudget()
    # Imported here: DP-SGD needs Opacus, whose import costs ~1.5 s in every process of a site
    # that trains without DP.
    from fed_unimiss.ssl.dp_step import DPStep, check_dp_recipe, site_sample_rate

    check_dp_recipe(recipe)
    privacy.validate()
    guard = LedgerGuard(state_dir, privacy, site_sample_rate(privacy, data), steps_per_interval)
    return DPStep(privacy, guard.noise_multiplier), guard  # sampling and noise: a secret seed


@dataclass
class LocalRun:
    """What one stretch of local training produced."""

    stats: TrainStats | None                 # None: the guard refused, nothing was trained
    public: dict[str, float] = field(default_factory=dict)  # may leave the site
    refusal: str | None = None               # the guard's message when it refused

    @property
    def trained(self) -> bool:
        return self.stats is not None


def run_local(engine: SelfDistillation, data: SiteData, start_step: int, num_steps: int,
              guard: BudgetGuard, *, interval: int,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> LocalRun:
    """Train global steps [start_step, start_step + num_steps) if ``guard`` allows stretch
    ``interval`` (a round, or a checkpoint interval), then commit it before returning."""
    refusal = guard.plan(interval, num_steps)
    if refusal is not None:
        return LocalRun(None, guard.refusal_metrics(), refusal)
    stats = engine.train_steps(data, start_step, num_steps, on_step=on_step)
    log.info("stretch %d: %d steps, %d empty batches, mean loss %.4f (site log only)", interval,
             stats.steps, stats.empty_batches, stats.loss)
    counts = engine.public_metrics(data, start_step, num_steps, stats)
    return LocalRun(stats, {**counts, **guard.commit()})


def with_planned_intervals(privacy: PrivacyConfig, total_steps: int, every: int
                           ) -> PrivacyConfig:
    """A single-site run spreads its budget over its checkpoint intervals (one "round" each)."""
    return dataclasses.replace(privacy, enabled=True,
                               planned_rounds=max(1, math.ceil(total_steps / every)))
