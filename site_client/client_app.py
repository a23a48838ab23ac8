"""The site's Flower ClientApp (component reference ``site_client.client_app:app``).

Adapters only: Message -> recipe, global state and site data -> the shared trainer -> Message.
A reply carries the model-state tensors, numeric counts and metrics, and at most the site's
self-declared label; any failure becomes an error reply with a fixed text (the details, which may
name local files, go to the site's own log only).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_unimiss import exchange as ex
from site_client.local_state import SiteState
from site_client.privacy_ledger import (
    dp_evaluate,
    dp_required,
    dp_train,
    refuse_without_dp,
    site_privacy,
)

__all__ = ["app"]

log = logging.getLogger(__name__)

# Error codes of a reply; the text is fixed so nothing site-specific leaves the site.
ERROR_TRAIN, ERROR_EVALUATE = 5001, 5002

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[Any, SiteState, Any, dict[str, Any]]:
    """Recipe and schedule from the instruction, site data from node config, global state loaded."""
    from fed_unimiss.ssl.config import recipe_from_dict
    from fed_unimiss.ssl.engine import SelfDistillation

    config = msg.content.config_records[ex.CONFIG]
    recipe = recipe_from_dict(json.loads(str(config[ex.RECIPE_JSON])), "instruction recipe")
    job = {k: int(config[k]) for k in (ex.ROUND, ex.LOCAL_STEPS, ex.START_STEP, ex.TOTAL_STEPS,
                                       ex.EVAL_BATCHES)}
    torch.set_num_threads(recipe.ssl.threads)
    site = SiteState.from_node_config(context.node_config)
    data = site.site_data(recipe.data, context.run_id)
    trainer = SelfDistillation(recipe, job[ex.TOTAL_STEPS])
    trainer.load_exchange_state(msg.content.array_records[ex.ARRAYS].to_torch_state_dict())
    return trainer, site, data, {**job, "seed": recipe.ssl.seed}


def _reply(msg: Message, site: SiteState, metrics: dict[str, float],
           state: dict[str, torch.Tensor] | None = None) -> Message:
    content = RecordDict({ex.METRICS: MetricRecord(metrics)})
    if state is not None:
        content[ex.ARRAYS] = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
    if site.site_name is not None:
        content[ex.SITE] = ConfigRecord({ex.SITE_NAME_KEY: site.site_name})
    return Message(content, reply_to=msg)


def _finite_metrics(stats: Any) -> dict[str, float]:
    """The trainer's scalar metrics that are finite numbers (NaN = "not measured")."""
    out = {}
    for key in ex.TRAIN_METRICS:
        value = getattr(stats, key, None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train ``local_steps`` on local data from the received global state; reply the new state."""
    try:
        # Differential privacy (issue 7): a site with dp-* node config trains under its budget
        # ledger and may refuse the round; see site_client/privacy_ledger.py.
        privacy = site_privacy(context.node_config)
        if privacy is not None:
            return dp_train(msg, context, privacy)
        if dp_required(msg):  # federation require_dp: never release a non-private update
            return refuse_without_dp(msg)
        trainer, site, data, job = _setup(msg, context)
        label = site.site_name or f"node-{context.node_id}"
        torch.manual_seed(ex.site_seed(job["seed"], job[ex.ROUND], label))
        stats = trainer.train_steps(data, job[ex.START_STEP], job[ex.LOCAL_STEPS])
        site.record_position(job[ex.ROUND], job[ex.START_STEP], job[ex.LOCAL_STEPS],
                             job[ex.TOTAL_STEPS])
        metrics = {
            ex.SAMPLES_2D: int(stats.samples_2d),
            ex.SAMPLES_3D: int(stats.samples_3d),
            ex.NUM_EXAMPLES: int(stats.samples_2d) + int(stats.samples_3d),
            **_finite_metrics(stats),
        }
        return _reply(msg, site, metrics, trainer.exchange_state())
    except Exception:  # noqa: BLE001 - a site must answer, never crash, on any failure
        log.exception("training failed in this round")
        return Message(Error(ERROR_TRAIN, "site could not train this round; see the site log"),
                       reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Self-distillation loss of the received global model on a few local batches."""
    try:
        if site_privacy(context.node_config) is not None:  # issue 7: no un-noised metrics
            return dp_evaluate(msg)
        trainer, site, data, job = _setup(msg, context)
        result = trainer.evaluate(data, job[ex.EVAL_BATCHES])
        metrics = {ex.LOSS: float(result["loss"]),
                   ex.NUM_EXAMPLES: int(result.get("batches", 1))}
        return _reply(msg, site, metrics)
    except Exception:  # noqa: BLE001 - see train
        log.exception("evaluation failed in this round")
        return Message(Error(ERROR_EVALUATE, "site could not evaluate; see the site log"),
                       reply_to=msg)
