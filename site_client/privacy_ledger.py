"""The site side of differential privacy: its settings in the node config, its error codes.

A DP site (node config ``dp-epsilon`` set, e.g. by ``fed-unimiss site start --dp-epsilon 8``)
trains every round with the DP-SGD gradient step (:class:`fed_unimiss.ssl.dp_step.DPStep`) under
the budget kept in ``state-dir/privacy_ledger.json`` (:class:`fed_unimiss.ssl.local.LedgerGuard`);
the ClientApp (site_client/client_app.py) runs the protocol:

- before training, the round's cost is computed; if it would exceed the target the site replies
  a *refusal* (metrics ``dp_refused = 1`` and ``epsilon`` spent, no model state) and trains
  nothing; the ledger is on disk, so it keeps refusing after any restart;
- an unreadable ledger is an error reply: the site fails closed until the file is restored;
- after training, the ledger is committed *before* the reply is released;
- the reply carries only the model state, counts derived from the public schedule and config,
  and ``epsilon``; losses, batch sizes and timings computed from private data stay in the log;
- evaluation requests are declined: an un-noised loss on local data is not covered.

The node config keys (kebab-case, like every ``--node-config`` key) map to
:class:`~fed_unimiss.privacy.PrivacyConfig` fields in :data:`NODE_KEYS`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fed_unimiss.config import ConfigError, from_dict
from fed_unimiss.privacy.config import PrivacyConfig

__all__ = ["NODE_KEYS", "ERROR_LEDGER", "ERROR_DP_EVALUATE", "site_privacy",
           "privacy_node_config"]

log = logging.getLogger(__name__)

# Error codes of DP replies (the text is fixed: nothing site-specific leaves the site).
ERROR_LEDGER, ERROR_DP_EVALUATE = 5101, 5102

# node config key -> PrivacyConfig field. ``dp-epsilon`` switches DP on.
NODE_KEYS: dict[str, str] = {
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
}


def site_privacy(node_config: Mapping[str, Any]) -> PrivacyConfig | None:
    """The site's PrivacyConfig from its node config, or None when DP is off (no dp-epsilon).

    Raises:
        ConfigError: a dp-* value is malformed or out of range (the message names the key).
    """
    if node_config.get("dp-epsilon") in (None, ""):
        unknown = sorted(k for k in node_config if str(k).startswith("dp-"))
        if unknown:
            raise ConfigError(f"node config {unknown[0]!r} given without 'dp-epsilon': set "
                              "dp-epsilon to turn differential privacy on")
        return None
    values: dict[str, Any] = {"enabled": True}
    for key, value in node_config.items():
        if not str(key).startswith("dp-"):
            continue
        if key not in NODE_KEYS:
            raise ConfigError(f"node config {key!r}: unknown DP key (valid: "
                              f"{', '.join(sorted(NODE_KEYS))})")
        field = NODE_KEYS[key]
        if field == "planned_rounds" and isinstance(value, float) and value.is_integer():
            value = int(value)
        values[field] = value
    return from_dict(PrivacyConfig, values, where="node config (dp-*)")


def privacy_node_config(privacy: PrivacyConfig | None) -> dict[str, Any]:
    """The dp-* node config keys that make :func:`site_privacy` return ``privacy`` again.

    Empty when ``privacy`` is None or disabled (the site trains without DP). ``site start``
    writes these into the SuperNode's node config file; the ClientApp reads them back per message.
    """
    if privacy is None or not privacy.enabled:
        return {}
    privacy.validate()
    out: dict[str, Any] = {}
    for key, field in NODE_KEYS.items():
        value = getattr(privacy, field)
        if value is not None:  # noise_multiplier None = calibrate: the key is simply absent
            out[key] = value
    return out
