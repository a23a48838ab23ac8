"""The site's privacy budget ledger: the Opacus accountant's history, persisted and enforced.

Epsilon must be cumulative over every round and every restart of the site: a fresh
``PrivacyEngine`` per round (and in deployment every Flower message gets a fresh ClientApp
process) would start counting from zero and under-report. So the accountant's whole state, its
``history`` of ``(noise_multiplier, sample_rate, steps)`` entries, lives in one JSON file in the
site's state directory, and epsilon is always recomputed from it by an Opacus accountant (never by
hand).

The protocol, per round (the site's ClientApp drives it through
:class:`fed_unimiss.ssl.local.LedgerGuard`):

1. :meth:`PrivacyLedger.open` reads the file. A missing file is a fresh site; a file that exists
   but cannot be read or parsed is a :class:`LedgerError` and the site must refuse to train
   (fail closed: an unreadable ledger could hide spent budget).
2. :meth:`PrivacyLedger.plan` computes what the round would spend (the noise multiplier is
   calibrated once, at the first DP round, then reused) and whether the target still holds.
3. A refused plan is recorded (:meth:`record_refusal`) and the site replies with the refusal.
4. An allowed plan runs; :meth:`commit` writes the new history atomically *before* the site
   releases its reply. A crash between training and commit releases nothing, so nothing is lost.

The file holds only numbers (noise multipliers, sampling rates, step counts, epsilons), no data.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_unimiss.checkpoint import atomic_write_json

from .config import PrivacyConfig

__all__ = [
    "LEDGER_FILE",
    "LedgerError",
    "RoundPlan",
    "PrivacyLedger",
    "epsilon_of",
    "calibrate_noise_multiplier",
    "accounted_multiplier",
    "clear_accounting_cache",
]

logger = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.json"
_FORMAT = 1

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as Opacus


class LedgerError(RuntimeError):
    """The ledger cannot be trusted (unreadable, corrupt, inconsistent): the site must refuse."""


def epsilon_of(history: list[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by ``history`` at ``delta``, computed by an Opacus accountant.

    Every plan, commit and save asks for the epsilon of the same few histories, and one RDP
    evaluation costs ~0.1-0.4 s (fractional orders are series sums), so results are memoised on
    the exact history: the accountant is a pure function of it.
    """
    if not history:
        return 0.0
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return _epsilon_cached(key, float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon_cached(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    # Opacus (and the scipy it pulls in) costs ~1.5 s to import; a site without DP never needs it.
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def _calibrated(epsilon: float, delta: float, sample_rate: float, steps: int,
                accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))


def clear_accounting_cache() -> None:
    """Forget memoised accountant results (what a restarted site process starts with)."""
    _epsilon_cached.cache_clear()
    _calibrated.cache_clear()


def calibrate_noise_multiplier(
    config: PrivacyConfig, sample_rate: float, steps_per_round: int
) -> float:
    """Per-mechanism sigma such that ``planned_rounds`` rounds of ``steps_per_round`` steps spend
    the target.

    With a noised center each step releases two Gaussian sums of the SAME Poisson sample (the
    clipped gradients and the clipped teacher means), each with noise ``sigma x clip``. Scaled by
    their clips, the pair is one Gaussian mechanism with L2 sensitivity sqrt(2) and noise sigma,
    i.e. noise multiplier sigma / sqrt(2) (see :func:`accounted_multiplier`). Opacus's binary
    search calibrates that accounted multiplier; the per-mechanism sigma is sqrt(k) times it.
    The search (~2-3 s, tens of accountant evaluations) is memoised per process.
    """
    accounted = _calibrated(float(config.target_epsilon), float(config.target_delta),
                            float(sample_rate), int(config.planned_rounds * steps_per_round),
                            config.accountant)
    return accounted * math.sqrt(config.mechanisms_per_step)


def accounted_multiplier(config: PrivacyConfig, noise_multiplier: float) -> float:
    """Noise multiplier the accountant sees for one step: sigma / sqrt(mechanisms per step)."""
    return noise_multiplier / math.sqrt(config.mechanisms_per_step)


@dataclass(frozen=True)
class RoundPlan:
    """What one round would spend, decided before any training happens."""

    server_round: int
    steps: int
    sample_rate: float
    # Std of each mechanism's noise / its clip (what DPOptimizer and the center update use).
    noise_multiplier: float
    epsilon_before: float
    epsilon_after: float
    target_epsilon: float
    delta: float
    allowed: bool

    @property
    def message(self) -> str:
        """One line for logs and the refusal reply (numbers only, nothing about the data)."""
        if self.allowed:
            return (
                f"round {self.server_round}: DP budget allows it (epsilon {self.epsilon_before:.3f}"
                f" -> {self.epsilon_after:.3f} of {self.target_epsilon:g} at delta {self.delta:g})"
            )
        return (
            f"round {self.server_round} refused: privacy budget exhausted (epsilon spent "
            f"{self.epsilon_before:.3f}; this round would bring it to {self.epsilon_after:.3f}, "
            f"above the target {self.target_epsilon:g} at delta {self.delta:g})"
        )


class PrivacyLedger:
    """The persisted accountant history of one site, with budget checks.

    Use :meth:`open`; the constructor takes already-validated state.
    """

    def __init__(
        self,
        path: Path,
        config: PrivacyConfig,
        history: list[HistoryEntry],
        noise_multiplier: float | None,
        rounds: list[dict[str, Any]],
        refusals: list[dict[str, Any]],
    ) -> None:
        self.path = path
        self.config = config
        self.history = history
        self.noise_multiplier = noise_multiplier
        self.rounds = rounds
        self.refusals = refusals

    # ---- persistence -------------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str | Path, config: PrivacyConfig) -> PrivacyLedger:
        """Read ``state_dir/privacy_ledger.json`` (a fresh ledger if it does not exist).

        Raises:
            LedgerError: the file exists but is unreadable, not JSON, or not a valid ledger.
        """
        config.validate()
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path, config, [], None, [], [])
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LedgerError(
                f"{path}: privacy ledger unreadable ({e}); refusing to train until it is "
                "restored from backup (deleting it would forget the budget already spent)"
            ) from e
        return cls._from_json(path, config, data)

    @classmethod
    def _from_json(cls, path: Path, config: PrivacyConfig, data: Any) -> PrivacyLedger:
        def bad(what: str) -> LedgerError:
            return LedgerError(f"{path}: invalid privacy ledger: {what}; refusing to train")

        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise bad(f"expected a mapping with format {_FORMAT}")
        raw = data.get("history")
        if not isinstance(raw, list):
            raise bad("'history' must be a list")
        history: list[HistoryEntry] = []
        for i, entry in enumerate(raw):
            if (
                not isinstance(entry, list)
                or len(entry) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry)
            ):
                raise bad(f"history[{i}] must be [noise_multiplier, sample_rate, steps]")
            sigma, q, steps = float(entry[0]), float(entry[1]), entry[2]
            if not (sigma > 0 and math.isfinite(sigma) and 0 < q <= 1 and int(steps) == steps
                    and steps >= 0):
                raise bad(f"history[{i}] = {entry} is out of range")
            history.append((sigma, q, int(steps)))
        sigma = data.get("noise_multiplier")
        if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
            raise bad("'noise_multiplier' must be a positive number or null")
        rounds, refusals = data.get("rounds", []), data.get("refusals", [])
        if not isinstance(rounds, list) or not isinstance(refusals, list):
            raise bad("'rounds' and 'refusals' must be lists")
        return cls(path, config, history, None if sigma is None else float(sigma), rounds,
                   refusals)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "accountant": self.config.accountant,
            "target_epsilon": self.config.target_epsilon,
            "target_delta": self.config.target_delta,
            "noise_multiplier": self.noise_multiplier,
            "history": [list(h) for h in self.history],
            "epsilon": self.epsilon(),
            "rounds": self.rounds,
            "refusals": self.refusals,
        }

    def save(self) -> None:
        """Write the ledger atomically (a crash leaves the old or the new file, never half)."""
        atomic_write_json(self.path, self.to_json())

    # ---- budget ------------------------------------------------------------------------------
    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far (at the config's delta unless given)."""
        return epsilon_of(self.history, delta or self.config.target_delta, self.config.accountant)

    def resolve_noise_multiplier(self, sample_rate: float, steps_per_round: int) -> float:
        """Config sigma if set, else the one calibrated at the first DP round, else calibrate."""
        if self.config.noise_multiplier is not None:
            return self.config.noise_multiplier
        if self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise_multiplier(
                self.config, sample_rate, steps_per_round
            )
            logger.info(
                "calibrated DP noise multiplier %.4f for epsilon %g over %d rounds of %d steps "
                "(sampling rate %.4g)", self.noise_multiplier, self.config.target_epsilon,
                self.config.planned_rounds, steps_per_round, sample_rate,
            )
        return self.noise_multiplier

    def plan(self, server_round: int, steps: int, sample_rate: float) -> RoundPlan:
        """What round ``server_round`` (``steps`` DP steps at rate ``sample_rate``) would spend."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        sigma = self.resolve_noise_multiplier(sample_rate, max(steps, 1))
        entries = [(accounted_multiplier(self.config, sigma), sample_rate, steps)]
        before = self.epsilon()
        after = epsilon_of(self.history + entries, self.config.target_delta,
                           self.config.accountant)
        return RoundPlan(
            server_round=server_round,
            steps=steps,
            sample_rate=sample_rate,
            noise_multiplier=sigma,
            epsilon_before=before,
            epsilon_after=after,
            target_epsilon=self.config.target_epsilon,
            delta=self.config.target_delta,
            allowed=after <= self.config.target_epsilon,
        )

    def commit(self, plan: RoundPlan) -> float:
        """Add an allowed round to the history and persist it; returns epsilon spent so far."""
        if not plan.allowed:
            raise ValueError(f"cannot commit a refused round: {plan.message}")
        sigma = accounted_multiplier(self.config, plan.noise_multiplier)
        self.history.append((sigma, plan.sample_rate, plan.steps))
        eps = self.epsilon()
        self.rounds.append({
            "server_round": plan.server_round,
            "steps": plan.steps,
            "sample_rate": plan.sample_rate,
            "noise_multiplier": plan.noise_multiplier,
            "epsilon": eps,
        })
        self.save()
        return eps

    def record_refusal(self, plan: RoundPlan) -> None:
        """Remember a refused round (for the operator; the refusal itself needs no record)."""
        self.refusals.append({
            "server_round": plan.server_round,
            "steps": plan.steps,
            "epsilon_before": plan.epsilon_before,
            "epsilon_would_be": plan.epsilon_after,
        })
        self.save()
