"""``PrivacyConfig``: a site's differential-privacy settings, as data.

Loaded from the ``privacy`` section of a site YAML with :func:`fed_unimiss.config.from_dict`;
the ``--dp-*`` flags of ``site start`` / ``pretrain`` and the ``dp-*`` node-config keys a site's
ClientApp reads are one vocabulary, :data:`DP_KEYS`, applied by :func:`with_dp_settings`. What the numbers mean is in docs/privacy.md: the
guarantee is (target_epsilon, target_delta)-DP *per patient at the site*, cumulative over every
round and every restart of the site.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fed_unimiss.config import ConfigError, from_dict, to_dict

__all__ = ["PrivacyConfig", "CENTER_FROZEN", "CENTER_GAUSSIAN", "DP_KEYS", "with_dp_settings",
           "dp_settings_of"]

CENTER_FROZEN = "frozen"
CENTER_GAUSSIAN = "gaussian"


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD with patient-level Poisson sampling and an enforced (epsilon, delta) budget."""

    # Off by default: a site trains without DP unless its config (or --dp-epsilon) turns it on.
    enabled: bool = False
    # Total budget of the site over the whole federation, per patient. Smaller = more private and
    # more noise; 1-10 is the usual range. The site refuses any round that would exceed it.
    target_epsilon: float = 8.0
    # Probability of failure of the guarantee; keep well below 1 / number of patients.
    target_delta: float = 1e-5
    # Per-patient L2 clip of the gradient (Opacus ``max_grad_norm``). Lower = less signal, same
    # privacy; 0.1-1 works for AdamW.
    max_grad_norm: float = 1.0
    # Gaussian noise std / max_grad_norm. null: calibrated once, at the site's first DP round, so
    # that planned_rounds rounds spend exactly the target (then stored in the ledger and reused).
    noise_multiplier: float | None = None
    # Rounds the calibration spreads the budget over; the site refuses round planned_rounds + 1
    # (with the same number of local steps). Raise it for longer federations.
    planned_rounds: int = 10
    # Expected number of patients per step: the Poisson rate is q = this / patients at the site
    # (capped at 1). Larger batches average out more noise for the same epsilon.
    patients_per_step: float = 4.0
    # Opacus accountant: "rdp" (Renyi DP, the default) or "prv" (tighter, slower).
    accountant: Literal["rdp", "prv"] = "rdp"
    # DINO center under DP (docs/privacy.md): "frozen" keeps the center received from the
    # aggregator (costs no budget); "gaussian" updates it with a clipped, noised per-patient mean
    # accounted as a second subsampled Gaussian mechanism per step (same noise multiplier).
    center: Literal["frozen", "gaussian"] = CENTER_FROZEN
    # L2 clip of one patient's mean teacher logits in the "gaussian" center update.
    center_clip: float = 1.0
    # Draw the noise with a cryptographically secure generator (Opacus secure_mode; slower).
    secure_mode: bool = False
    # When the federation's announced DP plan accepts fewer patients per step than this site's
    # patients_per_step, train with the plan's value (true: a lower sampling rate, so every round
    # costs less epsilon; target, delta, clip and ledger unchanged) or refuse the round before
    # training (false). Either way no budget is spent on an update the plan rules out.
    adopt_plan: bool = True

    def validate(self) -> None:
        """Cross-field checks; raises ``ValueError`` naming the field and the fix."""
        if self.target_epsilon <= 0:
            raise ValueError(f"target_epsilon: must be > 0, got {self.target_epsilon}")
        if not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta: must be in (0, 1), got {self.target_delta}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ValueError(
                f"noise_multiplier: must be > 0 (or null to calibrate from the target), got "
                f"{self.noise_multiplier}"
            )
        if self.planned_rounds < 1:
            raise ValueError(f"planned_rounds: must be >= 1, got {self.planned_rounds}")
        if self.patients_per_step <= 0:
            raise ValueError(f"patients_per_step: must be > 0, got {self.patients_per_step}")
        if self.center_clip <= 0:
            raise ValueError(f"center_clip: must be > 0, got {self.center_clip}")

    @property
    def mechanisms_per_step(self) -> int:
        """Subsampled Gaussian mechanisms composed per optimiser step (gradient [+ center])."""
        return 2 if self.center == CENTER_GAUSSIAN else 1


# dp-* setting (node-config key; the flag is --dp-*) -> PrivacyConfig field. dp-epsilon turns DP on.
DP_KEYS: dict[str, str] = {
    "dp-epsilon": "target_epsilon",
    "dp-delta": "target_delta",
    "dp-clip": "max_grad_norm",
    "dp-noise-multiplier": "noise_multiplier",
    "dp-planned-rounds": "planned_rounds",
    "dp-patients-per-step": "patients_per_step",
    "dp-center": "center",
    "dp-accountant": "accountant",
    "dp-center-clip": "center_clip",
    "dp-secure-mode": "secure_mode",
    "dp-adopt-plan": "adopt_plan",
}
_INTEGER_FIELDS = ("planned_rounds",)


def with_dp_settings(base: PrivacyConfig, settings: Mapping[str, Any], where: str,
                     spell: Callable[[str], str] = repr, fix: str = "") -> PrivacyConfig:
    """``base`` with the given ``dp-*`` settings applied and everything validated.

    ``dp-epsilon`` turns DP on. An unknown key, or a setting while DP stays off, is a
    ``ConfigError`` naming the key as the caller's users write it (``spell``: a node-config key,
    or a ``--flag``); ``fix`` says how to turn DP on there. Values are checked like YAML fields
    (errors name ``where`` and the field).
    """
    unknown = sorted(set(settings) - set(DP_KEYS))
    if unknown:
        raise ConfigError(f"{spell(unknown[0])}: unknown DP setting (valid: "
                          f"{', '.join(spell(k) for k in DP_KEYS)})")
    values = to_dict(base)
    for key, value in settings.items():
        field = DP_KEYS[key]
        if field in _INTEGER_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)  # node config and flag values may arrive as floats
        values[field] = value
    if "dp-epsilon" in settings:
        values["enabled"] = True
    if not values["enabled"] and settings:
        raise ConfigError(f"{spell(sorted(settings)[0])} given but differential privacy is off, "
                          f"without {spell('dp-epsilon')}{': ' + fix if fix else ''}")
    return from_dict(PrivacyConfig, values, where)


def dp_settings_of(privacy: PrivacyConfig | None) -> dict[str, Any]:
    """The ``dp-*`` settings that make :func:`with_dp_settings` rebuild ``privacy``.

    Empty when ``privacy`` is None or disabled; a None value (noise multiplier: calibrate) is
    simply absent.
    """
    if privacy is None or not privacy.enabled:
        return {}
    privacy.validate()
    return {key: getattr(privacy, field) for key, field in DP_KEYS.items()
            if getattr(privacy, field) is not None}
