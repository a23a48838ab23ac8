"""The site side of differential privacy: settings from the node config, ledger, refusal.

A DP site (node config ``dp-epsilon`` set, e.g. by ``fed-unimiss site start --dp-epsilon 8``)
trains every round with :class:`fed_unimiss.privacy.DPSelfDistillation` under the budget kept in
``state-dir/privacy_ledger.json``:

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

import json
import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fed_unimiss import exchange as ex
from fed_unimiss.config import ConfigError, from_dict
from fed_unimiss.privacy import (
    DP_REFUSED,
    EPSILON,
    ERROR_DP_REQUIRED,
    REQUIRE_DP,
    DPSelfDistillation,
    LedgerError,
    PrivacyConfig,
    PrivacyLedger,
    check_dp_recipe,
    public_train_metrics,
    site_sample_rate,
)
from site_client.local_state import SiteState

__all__ = ["NODE_KEYS", "ERROR_LEDGER", "ERROR_DP_EVALUATE", "site_privacy",
           "privacy_node_config", "dp_required", "refuse_without_dp", "dp_train", "dp_evaluate"]

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


def dp_required(msg: Message) -> bool:
    """True when the instruction says the federation accepts DP updates only (``require_dp``)."""
    config = msg.content.config_records.get(ex.CONFIG)
    return config is not None and bool(config.get(REQUIRE_DP, False))


def refuse_without_dp(msg: Message) -> Message:
    """Reply of a non-DP site to a federation that requires DP: nothing trained, nothing sent."""
    log.warning("the federation requires differential privacy and this site has none "
                "configured: refusing to train. Restart the site with --dp-epsilon E (or a "
                "privacy section in site.yaml) to take part.")
    return Message(Error(ERROR_DP_REQUIRED, "federation requires differential privacy; this "
                         "site trains without it and refuses"), reply_to=msg)


def _metrics_reply(msg: Message, site: SiteState, metrics: dict[str, Any],
                   state: dict[str, Any] | None = None) -> Message:
    content = RecordDict({ex.METRICS: MetricRecord(metrics)})
    if state is not None:
        content[ex.ARRAYS] = ArrayRecord({k: v.detach().float().cpu() for k, v in state.items()})
    if site.site_name is not None:
        content[ex.SITE] = ConfigRecord({ex.SITE_NAME_KEY: site.site_name})
    return Message(content, reply_to=msg)


def dp_train(msg: Message, context: Context, privacy: PrivacyConfig) -> Message:
    """The train handler of a DP site: plan against the ledger, refuse or train, commit, reply."""
    from fed_unimiss.ssl.config import recipe_from_dict

    config = msg.content.config_records[ex.CONFIG]
    recipe = recipe_from_dict(json.loads(str(config[ex.RECIPE_JSON])), "instruction recipe")
    check_dp_recipe(recipe)
    round_num, steps = int(config[ex.ROUND]), int(config[ex.LOCAL_STEPS])
    start, total = int(config[ex.START_STEP]), int(config[ex.TOTAL_STEPS])
    site = SiteState.from_node_config(context.node_config)
    try:
        ledger = PrivacyLedger.open(site.state_dir, privacy)
    except LedgerError:
        log.exception("privacy ledger unusable: refusing to train (fail closed)")
        return Message(Error(ERROR_LEDGER, "site privacy ledger unreadable; site refuses to "
                             "train until it is restored"), reply_to=msg)
    data = site.site_data(recipe.data, context.run_id)
    plan = ledger.plan(round_num, steps, site_sample_rate(privacy, data))
    if not plan.allowed:
        ledger.record_refusal(plan)
        log.warning("%s", plan.message)
        return _metrics_reply(msg, site, {DP_REFUSED: 1, EPSILON: plan.epsilon_before})
    log.info("%s", plan.message)
    trainer = DPSelfDistillation(recipe, total, privacy, plan.noise_multiplier)
    trainer.load_exchange_state(msg.content.array_records[ex.ARRAYS].to_torch_state_dict())
    stats = trainer.train_steps(data, start, steps)
    log.info("DP round %d: %d steps, %d empty batches, mean loss %.4f (site log only)",
             round_num, stats.steps, stats.empty_batches, stats.loss)
    epsilon = ledger.commit(plan)  # persisted before anything is released
    site.record_position(round_num, start, steps, total)
    steps_2d, steps_3d = trainer.phase_counts(data, start, steps)
    public = public_train_metrics(privacy, stats, recipe.ssl.view_depth, steps_2d, steps_3d)
    s2d, s3d = round(public["samples_2d"]), round(public["samples_3d"])
    metrics = {ex.SAMPLES_2D: s2d, ex.SAMPLES_3D: s3d, ex.NUM_EXAMPLES: s2d + s3d,
               ex.STEPS: float(stats.steps), EPSILON: epsilon, DP_REFUSED: 0}
    return _metrics_reply(msg, site, metrics, trainer.exchange_state())


def dp_evaluate(msg: Message) -> Message:
    """A DP site declines evaluation: an un-noised local loss is not covered by its guarantee."""
    log.info("evaluation request declined: this site releases only DP-trained state")
    return Message(Error(ERROR_DP_EVALUATE, "DP site: local evaluation metrics are not "
                         "released"), reply_to=msg)
