"""The site side of differential privacy: its settings in the node config, its error codes.

A DP site (node config ``dp-epsilon`` set, e.g. by ``fed-unimiss site start --dp-epsilon 8``)
trains every round with the DP-SGD gradient step (:class:`fed_unimiss.ssl.dp_step.DPStep`) under
the budget kept in ``state-dir/privacy_ledger.json`` (:class:`fed_unimiss.ssl.local.LedgerGuard`);
the ClientApp (site_client/client_app.py) runs the protocol:

- before the ledger is opened, the site's settings are fitted to the federation's announced DP
  plan (:mod:`site_client.dp_plan`): adopted, or the round refused (error 5105) at no cost;
- before training, the round's cost is computed; if it would exceed the target the site replies
  a *refusal* (metrics ``dp_refused = 1`` and ``epsilon`` spent, no model state) and trains
  nothing; the ledger is on disk, so it keeps refusing after any restart;
- an unreadable ledger is an error reply: the site fails closed until the file is restored;
- after training, the ledger is committed *before* the reply is released;
- the reply carries only the model state, counts derived from the public schedule and config,
  ``epsilon`` and ``epsilon_budget`` (the target, a setting); losses, batch sizes and timings computed from private data stay in the log;
- evaluation requests are declined: an un-noised loss on local data is not covered.

The node config keys (kebab-case, like every ``--node-config`` key) map to
:class:`~fed_unimiss.privacy.PrivacyConfig` fields in :data:`NODE_KEYS`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fed_unimiss.privacy.config import DP_KEYS, PrivacyConfig, dp_settings_of, with_dp_settings

__all__ = ["NODE_KEYS", "ERROR_LEDGER", "ERROR_DP_EVALUATE", "site_privacy",
           "privacy_node_config"]

log = logging.getLogger(__name__)

# Error codes of DP replies (the text is fixed: nothing site-specific leaves the site).
ERROR_LEDGER, ERROR_DP_EVALUATE = 5101, 5102

NODE_KEYS = DP_KEYS  # node config key -> PrivacyConfig field; dp-epsilon switches DP on


def site_privacy(node_config: Mapping[str, Any]) -> PrivacyConfig | None:
    """The site's PrivacyConfig from its node config, or None when DP is off (no dp-epsilon).

    Raises:
        ConfigError: a dp-* value is malformed or out of range (the message names the key).
    """
    settings = {k: v for k, v in node_config.items() if str(k).startswith("dp-")}
    if settings.get("dp-epsilon") in (None, ""):  # present but empty: DP off
        settings.pop("dp-epsilon", None)
    if not settings:
        return None
    return with_dp_settings(PrivacyConfig(), settings, "node config (dp-*)",
                            fix="set dp-epsilon in the node config to turn it on")


def privacy_node_config(privacy: PrivacyConfig | None) -> dict[str, Any]:
    """The dp-* node config keys that make :func:`site_privacy` return ``privacy`` again.

    Empty when ``privacy`` is None or disabled (the site trains without DP). ``site start``
    writes these into the SuperNode's node config file; the ClientApp reads them back per message.
    """
    return dp_settings_of(privacy)
