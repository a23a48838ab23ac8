"""Differential privacy at the site: patient-level DP-SGD (Opacus) and an enforced budget.

- :class:`PrivacyConfig` the site's settings (target epsilon/delta, clip, sampling, center);
- :class:`PatientPoissonSampler` Poisson sampling of patients, one row per patient;
- :func:`per_sample_gradients`, :class:`DPSGD` per-patient gradients (the head's last layer
  ghost-clipped), Opacus noise;
- :class:`PrivacyLedger` the accountant history persisted in the site's state directory.

The DP gradient step of the self-distillation engine built from these is
:class:`fed_unimiss.ssl.dp_step.DPStep`; this package is the mechanism and the accounting only
and imports nothing from ``fed_unimiss.ssl``. The guarantee and every choice behind it are in
docs/privacy.md. Nothing here imports flwr.

The config and the reply vocabulary are imported eagerly (no torch); everything that needs
torch or Opacus is imported on first use (PEP 562), so ``fed-unimiss site start`` can read a
site's privacy settings without paying ~10 s of torch/Opacus import before its kit checks.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import CENTER_FROZEN, CENTER_GAUSSIAN, PrivacyConfig
from .report import (
    DP_REFUSED,
    EPSILON,
    ERROR_DP_REQUIRED,
    REQUIRE_DP,
    privacy_refusal,
    reported_epsilon,
)

# public name -> submodule that defines it (imported lazily)
_LAZY = {
    "DPSGD": "dp_sgd",
    "noised_mean": "dp_sgd",
    "per_sample_gradients": "dp_sgd",
    "GhostFactors": "dp_sgd",
    "linear_layers": "dp_sgd",
    "LEDGER_FILE": "ledger",
    "LedgerError": "ledger",
    "PrivacyLedger": "ledger",
    "RoundPlan": "ledger",
    "accounted_multiplier": "ledger",
    "calibrate_noise_multiplier": "ledger",
    "clear_accounting_cache": "ledger",
    "epsilon_of": "ledger",
    "PatientPoissonSampler": "sampling",
    "sample_rate_for": "sampling",
}

__all__ = [
    "CENTER_FROZEN",
    "CENTER_GAUSSIAN",
    "DPSGD",
    "DP_REFUSED",
    "EPSILON",
    "ERROR_DP_REQUIRED",
    "LEDGER_FILE",
    "LedgerError",
    "PatientPoissonSampler",
    "PrivacyConfig",
    "PrivacyLedger",
    "REQUIRE_DP",
    "RoundPlan",
    "accounted_multiplier",
    "calibrate_noise_multiplier",
    "clear_accounting_cache",
    "epsilon_of",
    "noised_mean",
    "per_sample_gradients",
    "GhostFactors",
    "linear_layers",
    "privacy_refusal",
    "reported_epsilon",
    "sample_rate_for",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
