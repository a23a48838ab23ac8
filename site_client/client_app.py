"""The site's Flower ClientApp (component reference ``site_client.client_app:app``).

The protocol, as it reads below: receive the global state and the round's instruction; train
locally with the one trainer (:func:`fed_unimiss.ssl.local.run_local`, plain or DP-SGD under the
site's budget ledger, see site_client/privacy_ledger.py); reply with the new state and the
metrics that may leave the site, or with the budget refusal. A reply carries only model-state
tensors, numeric counts and metrics, and at most the site's self-declared label; any failure
becomes an error reply with a fixed text (the details, which may name local files, go to the
site's own log only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_unimiss import exchange as ex
from fed_unimiss.privacy import ERROR_DP_REQUIRED, REQUIRE_DP, LedgerError
from fed_unimiss.runtime import Runtime
from fed_unimiss.ssl.config import Recipe, recipe_from_dict
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.gradient_step import GradientStep
from fed_unimiss.ssl.local import run_local, training_mode
from fed_unimiss.ssl.local_parallel import run_local_data_parallel, usable_workers
from site_client.local_state import SiteState
from site_client.privacy_ledger import ERROR_DP_EVALUATE, ERROR_LEDGER, site_privacy

__all__ = ["app", "Instruction", "ERROR_TRAIN", "ERROR_EVALUATE"]

log = logging.getLogger(__name__)

# Error codes of a reply; the text is fixed so nothing site-specific leaves the site.
ERROR_TRAIN, ERROR_EVALUATE = 5001, 5002

app = ClientApp()


@dataclass(frozen=True)
class Instruction:
    """What the aggregator asks of every site this round (the same for all sites)."""

    recipe: Recipe
    round: int
    local_steps: int
    start_step: int
    total_steps: int
    eval_batches: int
    require_dp: bool  # the federation accepts updates from DP sites only

    @classmethod
    def from_message(cls, msg: Message) -> Instruction:
        config = msg.content.config_records[ex.CONFIG]
        recipe = recipe_from_dict(json.loads(str(config[ex.RECIPE_JSON])), "instruction recipe")
        return cls(recipe, int(config[ex.ROUND]), int(config[ex.LOCAL_STEPS]),
                   int(config[ex.START_STEP]), int(config[ex.TOTAL_STEPS]),
                   int(config[ex.EVAL_BATCHES]), bool(config.get(REQUIRE_DP, False)))


def _global_state(msg: Message) -> dict[str, torch.Tensor]:
    return msg.content.array_records[ex.ARRAYS].to_torch_state_dict()


def _engine(msg: Message, job: Instruction, runtime: Runtime, step: GradientStep | None = None
            ) -> SelfDistillation:
    """The trainer of this round's recipe on the site's device, holding the global state."""
    engine = SelfDistillation(job.recipe, job.total_steps, device=runtime.torch_device(),
                              gradient_step=step, precision=runtime.precision)
    engine.load_exchange_state(_global_state(msg))
    return engine


def _reply(msg: Message, site: SiteState, metrics: dict[str, float],
           state: dict[str, torch.Tensor] | None = None) -> Message:
    content = RecordDict({ex.METRICS: MetricRecord(metrics)})
    if state is not None:
        content[ex.ARRAYS] = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
    if site.site_name is not None:
        content[ex.SITE] = ConfigRecord({ex.SITE_NAME_KEY: site.site_name})
    return Message(content, reply_to=msg)


def _error(msg: Message, code: int, text: str, site_name: str | None = None) -> Message:
    """An error reply: the code, a fixed text and the site's label (so the coordinator can name
    the site; an error reply has no content records)."""
    return Message(Error(code, ex.error_reason(site_name, text)), reply_to=msg)


def _site_name(context: Context) -> str | None:
    name = context.node_config.get(ex.NODE_SITE_NAME)
    return str(name) if ex.is_valid_site_name(name) else None


def _record(context: Context, round_num: int, event: str, **fields: object) -> None:
    """Best effort: the site's terminal line for this message (site_client/supernode.py)."""
    try:
        SiteState.from_node_config(context.node_config).record_event(round_num, event, **fields)
    except Exception:  # noqa: BLE001 - progress display must never stop a reply
        log.debug("progress not recorded", exc_info=True)


def _untrainable(job: Instruction, privacy: object) -> str | None:
    """Why this site's settings cannot train the announced recipe (site-local text), or None."""
    if privacy is None:
        return None
    from fed_unimiss.ssl.dp_step import check_dp_recipe

    try:
        check_dp_recipe(job.recipe)
    except ValueError as e:
        return (f"differential privacy is on at this site, and the federation's recipe cannot "
                f"be trained with DP: {e}. Ask the coordinator for a DP-capable federation "
                "config (e.g. configs/federation/micro-dp.yaml), or start this site without "
                "--dp-epsilon")
    return None


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train ``local_steps`` on local data from the received global state; reply the new state."""
    name, round_num = _site_name(context), 0
    try:
        job = Instruction.from_message(msg)
        round_num = job.round
        privacy = site_privacy(context.node_config)
        if privacy is None and job.require_dp:  # never release a non-private update
            why = ("the federation requires differential privacy and this site has none "
                   "configured: refusing to train. Restart the site with --dp-epsilon E (or "
                   "a privacy section in site.yaml) to take part.")
            log.warning("%s", why)
            _record(context, round_num, "refused", why=why)
            return _error(msg, ERROR_DP_REQUIRED, "federation requires differential privacy; "
                          "this site trains without it and refuses", name)
        why = _untrainable(job, privacy)
        if why is not None:  # refuse before loading data or building a model: at once
            log.error("%s", why)
            _record(context, round_num, "refused", why=why)
            return _error(msg, ex.ERROR_RECIPE, "this site's settings cannot train the "
                          "federation's recipe", name)
        torch.set_num_threads(job.recipe.ssl.threads)
        site = SiteState.from_node_config(context.node_config)
        runtime = Runtime.from_node_config(context.node_config)
        data = site.site_data(job.recipe.data, context.run_id)
        label = site.site_name or f"node-{context.node_id}"
        seed = ex.site_seed(job.recipe.ssl.seed, job.round, label)
        workers = usable_workers(job.recipe, runtime.workers)
        if workers < runtime.workers:
            log.warning("the federation's recipe has batches of %d (2D) and %d (3D) with "
                        "accumulate %d: %d of this site's %d workers can take part; training "
                        "with %d", job.recipe.ssl.batch_size_2d, job.recipe.ssl.batch_size_3d,
                        job.recipe.ssl.accumulate, workers, runtime.workers, workers)
            runtime = dataclasses.replace(runtime, workers=workers)
        if runtime.workers > 1 and privacy is None:  # several processes, one update
            public, state = run_local_data_parallel(
                job.recipe, job.total_steps, _global_state(msg), site.state_dir,
                job.start_step, job.local_steps, interval=job.round, runtime=runtime, seed=seed,
                scratch_root=site.state_dir / "rounds")
            site.record_position(job.round, job.start_step, job.local_steps, job.total_steps)
            site.record_event(job.round, "trained", **_shown(public))
            return _reply(msg, site, public, state)
        try:
            step, guard = training_mode(job.recipe, privacy, site.state_dir, data,
                                        job.local_steps)
        except LedgerError:
            log.exception("privacy ledger unusable: refusing to train (fail closed)")
            site.record_event(job.round, "refused", why="the privacy ledger is unreadable; "
                              "restore STATE/privacy_ledger.json from its backup")
            return _error(msg, ERROR_LEDGER, "site privacy ledger unreadable; site refuses to "
                          "train until it is restored", name)
        engine = _engine(msg, job, runtime, step)
        torch.manual_seed(seed)
        local = run_local(engine, data, job.start_step, job.local_steps, guard,
                          interval=job.round)
        if not local.trained:  # the budget refused: metrics only, nothing trained
            site.record_event(job.round, "refused", why="the privacy budget is spent")
            return _reply(msg, site, local.public)
        site.record_position(job.round, job.start_step, job.local_steps, job.total_steps)
        site.record_event(job.round, "trained", **_shown(local.public))
        return _reply(msg, site, local.public, engine.exchange_state())
    except Exception as e:  # noqa: BLE001 - a site must answer, never crash, on any failure
        log.exception("training failed in this round")
        _record(context, round_num, "failed", why=f"{type(e).__name__}: {e}")
        return _error(msg, ERROR_TRAIN, "site could not train this round; see the site log",
                      name)


def _shown(public: dict[str, float]) -> dict[str, float]:
    """What the site's terminal line shows of a round it trained."""
    keys = (ex.STEPS, ex.LOSS_2D, ex.LOSS_3D, ex.SECONDS, "epsilon")
    return {k: public[k] for k in keys if k in public}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Self-distillation loss of the received global model on a few local batches."""
    try:
        if site_privacy(context.node_config) is not None:  # an un-noised loss is not covered
            log.info("evaluation request declined: this site releases only DP-trained state")
            return _error(msg, ERROR_DP_EVALUATE, "DP site: local evaluation metrics are not "
                          "released", _site_name(context))
        job = Instruction.from_message(msg)
        torch.set_num_threads(job.recipe.ssl.threads)
        site = SiteState.from_node_config(context.node_config)
        data = site.site_data(job.recipe.data, context.run_id)
        runtime = Runtime.from_node_config(context.node_config)
        result = _engine(msg, job, runtime).evaluate(data, job.eval_batches)
        metrics = {ex.LOSS: float(result["loss"]),
                   ex.NUM_EXAMPLES: int(result.get("batches", 1))}
        return _reply(msg, site, metrics)
    except Exception:  # noqa: BLE001 - see train
        log.exception("evaluation failed in this round")
        return _error(msg, ERROR_EVALUATE, "site could not evaluate; see the site log",
                      _site_name(context))
