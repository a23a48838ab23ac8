"""Differential privacy at the site: patient-level DP-SGD (Opacus) and an enforced budget.

- :class:`PrivacyConfig` the site's settings (target epsilon/delta, clip, sampling, center);
- :class:`PatientPoissonSampler` Poisson sampling of patients, one row per patient;
- :func:`per_sample_gradients`, :class:`DPSGD` per-patient gradients into Opacus's DPOptimizer;
- :class:`PrivacyLedger` the accountant history persisted in the site's state directory;
- :class:`DPSelfDistillation` the self-distillation engine with DP-SGD on the student.

The guarantee and every choice behind it are in docs/privacy.md. Nothing here imports flwr.
"""

from .config import CENTER_FROZEN, CENTER_GAUSSIAN, PrivacyConfig
from .dp_sgd import DPSGD, noised_mean, per_sample_gradients
from .ledger import (
    LEDGER_FILE,
    LedgerError,
    PrivacyLedger,
    RoundPlan,
    accounted_multiplier,
    calibrate_noise_multiplier,
    epsilon_of,
)
from .report import DP_REFUSED, EPSILON, privacy_refusal
from .sampling import PatientPoissonSampler, sample_rate_for
from .trainer import (
    DPSelfDistillation,
    check_dp_recipe,
    public_train_metrics,
    site_sample_rate,
)

__all__ = [
    "CENTER_FROZEN",
    "CENTER_GAUSSIAN",
    "DP_REFUSED",
    "DPSGD",
    "DPSelfDistillation",
    "EPSILON",
    "LEDGER_FILE",
    "LedgerError",
    "PatientPoissonSampler",
    "PrivacyConfig",
    "PrivacyLedger",
    "RoundPlan",
    "accounted_multiplier",
    "calibrate_noise_multiplier",
    "check_dp_recipe",
    "epsilon_of",
    "noised_mean",
    "per_sample_gradients",
    "privacy_refusal",
    "public_train_metrics",
    "sample_rate_for",
    "site_sample_rate",
]
