"""One round's work at a site, without Flower: decode, train or evaluate, encode the reply.

The ClientApp (:mod:`site_client.client_app`) is a thin shim. In deployment it hands every
message to the site's warm worker (:mod:`site_client.worker`), which calls :func:`handle`
in a process that keeps torch imported, the trainer built, the data index open and the
site's exchange memory (int8 error-feedback residual, site-local teacher) between rounds.
Under ``simulate`` the shim calls :func:`handle` in its own process, which is warm as well.

Requests and replies are plain data (:class:`RoundRequest`, :class:`RoundReply`): numpy arrays,
numbers and short strings, so they cross the worker's local socket with no Flower object.
A reply carries only model-state tensors (and their int8 scales), numeric counts and metrics,
and at most the site's self-declared label; any failure becomes an error code with a fixed
text (the details, which may name local files, go to the site's own log only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fed_unimiss import exchange as ex
from fed_unimiss import exchange_codec as codec
from fed_unimiss.privacy import ERROR_DP_REQUIRED, REQUIRE_DP, LedgerError
from fed_unimiss.privacy.report import ERROR_DP_PLAN
from fed_unimiss.runtime import Runtime
from fed_unimiss.ssl.config import Recipe, recipe_from_dict
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.gradient_step import GradientStep, PlainStep
from fed_unimiss.ssl.local import run_local, training_mode
from fed_unimiss.ssl.local_parallel import run_local_data_parallel, usable_workers
from site_client.dp_plan import fit_to_plan
from site_client.errors import ERROR_EVALUATE, ERROR_EXCHANGE, ERROR_TRAIN, ERROR_WORKER
from site_client.local_state import SiteState
from site_client.privacy_ledger import ERROR_DP_EVALUATE, ERROR_LEDGER, site_privacy
from site_client.probe_round import round_probe
from site_client.round_messages import RoundReply, RoundRequest

__all__ = ["RoundRequest", "RoundReply", "Instruction", "handle", "ERROR_TRAIN",
           "ERROR_EVALUATE", "ERROR_EXCHANGE", "ERROR_WORKER"]

log = logging.getLogger(__name__)



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
    exchange: codec.ExchangeConfig
    recipe_json: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Instruction:
        """Raises ``CodecError`` when the announced exchange cannot be honoured here."""
        exchange = codec.ExchangeConfig.from_config(config)
        text = str(config[ex.RECIPE_JSON])
        recipe = recipe_from_dict(json.loads(text), "instruction recipe")
        return cls(recipe, int(config[ex.ROUND]), int(config[ex.LOCAL_STEPS]),
                   int(config[ex.START_STEP]), int(config[ex.TOTAL_STEPS]),
                   int(config[ex.EVAL_BATCHES]), bool(config.get(REQUIRE_DP, False)), exchange,
                   text)


@dataclass
class _SiteMemory:
    """What a site keeps between rounds in this process (never sent)."""

    run_id: int | None = None
    residual: dict[str, torch.Tensor] = field(default_factory=dict)  # q8 error feedback
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)  # site-local teacher
    base: tuple[dict[str, torch.Tensor], str] | None = None  # down=q8_delta: (base, digest)
    data: tuple[Any, Any] | None = None  # (key, SiteData)
    engine: tuple[Any, SelfDistillation] | None = None  # (key, plain trainer)


_MEMORY: dict[str, _SiteMemory] = {}  # state dir -> memory: one entry per site


def _memory(site: SiteState, run_id: int) -> _SiteMemory:
    mem = _MEMORY.setdefault(str(site.state_dir), _SiteMemory())
    if mem.run_id != run_id:  # a new run: nothing of the last one carries over
        mem.run_id, mem.residual, mem.teacher, mem.base = run_id, {}, {}, None
    return mem


def _site_data(site: SiteState, mem: _SiteMemory, job: Instruction, run_id: int) -> Any:
    key = (run_id, job.recipe.data.ct_settings_hash(), job.recipe.data.xray_settings_hash())
    if mem.data is None or mem.data[0] != key:
        mem.data = (key, site.site_data(job.recipe.data, run_id))
    return mem.data[1]


def _engine(mem: _SiteMemory, job: Instruction, runtime: Runtime,
            step: GradientStep | None) -> SelfDistillation:
    """The trainer of this round's recipe; a plain one is built once and reused (fresh optimizer)."""
    if step is not None and not isinstance(step, PlainStep):  # DP: a fresh trainer per round
        return SelfDistillation(job.recipe, job.total_steps, device=runtime.torch_device(),
                                gradient_step=step, precision=runtime.precision)
    key = (job.recipe_json, job.total_steps, str(runtime.torch_device()), runtime.precision)
    if mem.engine is not None and mem.engine[0] == key:
        engine = mem.engine[1]
        engine.optimizer.state.clear()  # every round starts Adam afresh, as a new trainer does
        from fed_unimiss.runtime import grad_scaler

        engine.scaler = grad_scaler(engine.device, engine.precision)
        return engine
    engine = SelfDistillation(job.recipe, job.total_steps, device=runtime.torch_device(),
                              gradient_step=PlainStep(), precision=runtime.precision)
    mem.engine = (key, engine)
    return engine


def _received_state(req: RoundRequest, job: Instruction, mem: _SiteMemory
                    ) -> dict[str, torch.Tensor]:
    """The global state as this site trains from it: decoded, with its own teacher if local."""
    if job.exchange.down == "q8_delta":
        state = _state_from_base(req, mem)
    elif codec.PACKED in req.arrays:  # one flat array in the announced layout
        items = codec.layout_from_json(str(req.config.get(ex.EXCHANGE_LAYOUT, "[]")))
        flat = torch.from_numpy(np.ascontiguousarray(req.arrays[codec.PACKED]))
        state = codec.unpack_state(flat, items, job.exchange.down)
    else:
        state = {}
        for name, arr in req.arrays.items():
            wire = torch.from_numpy(np.ascontiguousarray(arr))
            state[name] = codec.decode_tensor(name, wire, job.exchange.down, tuple(arr.shape))
    if job.exchange.teacher == "local":
        for name in [n for n in state if n.startswith(ex.STUDENT_PREFIX)]:
            teacher = ex.TEACHER_PREFIX + name[len(ex.STUDENT_PREFIX):]
            kept = mem.teacher.get(teacher)
            # first round (or a restarted worker): the teacher starts as the student, as DINO's does
            state[teacher] = kept if kept is not None and kept.shape == state[name].shape \
                else state[name].clone()
    return state


def _state_from_base(req: RoundRequest, mem: _SiteMemory) -> dict[str, torch.Tensor]:
    """down=q8_delta: apply the delta to the base this site holds, or take the base in full.

    Raises ``CodecError`` when the delta is for a base this site does not hold (a restarted
    worker) or the result is not the base the aggregator announced; the aggregator then sends
    the full base next round. A train message's base is kept for the next delta; an
    evaluation's full state is not a base.
    """
    flat = torch.from_numpy(np.ascontiguousarray(req.arrays.get(codec.PACKED, np.zeros(0))))
    scales = req.arrays.get(codec.PACKED_SCALES)
    try:
        base = codec.receive_base(
            flat, None if scales is None else torch.from_numpy(np.ascontiguousarray(scales)),
            req.config, mem.base)
    except codec.CodecError:
        mem.base = None  # whatever it held is not the aggregator's: the full base comes next
        raise
    announced = req.config.get(ex.EXCHANGE_BASE)
    if announced is not None and req.kind == ex.TRAIN:
        mem.base = (base, str(announced))
    return dict(base)  # shared with mem.base: training loads copies and never writes these


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}


def _train_reply(site: SiteState, mem: _SiteMemory, job: Instruction,
                 received: dict[str, torch.Tensor], public: dict[str, float],
                 new_state: dict[str, torch.Tensor]) -> RoundReply:
    xc = job.exchange
    if xc.teacher == "local":
        mem.teacher = {k: v.detach().cpu().clone() for k, v in new_state.items()
                       if k.startswith(ex.TEACHER_PREFIX)}
    keys = codec.sent_keys(list(new_state), xc)
    if xc.up == "fp32":  # one array per tensor, named
        wire, _ = codec.encode_update(new_state, received, xc.up, keys)
        return RoundReply(public, _numpy(wire), None, site.site_name)
    values, scales = codec.pack_update(new_state, received, xc.up,
                                       codec.layout(new_state, keys), mem.residual)
    return RoundReply(public, _numpy({codec.PACKED: values}),
                      _numpy({codec.PACKED: scales}) if scales is not None else None,
                      site.site_name)


def _train(req: RoundRequest) -> RoundReply:
    try:
        job = Instruction.from_config(req.config)
    except codec.CodecError as e:
        log.warning("the federation announced an exchange this site cannot honour (%s): "
                    "refusing the round; update fed-unimiss at this site", e)
        return RoundReply.failed(ERROR_EXCHANGE, "site cannot honour the announced exchange "
                                 "codec; see the site log")
    privacy = site_privacy(req.node_config)
    site = SiteState.from_node_config(req.node_config)
    if privacy is None and job.require_dp:  # never release a non-private update
        why = ("the federation requires differential privacy and this site has none "
               "configured: refusing to train. Restart the site with --dp-epsilon E (or "
               "a privacy section in site.yaml) to take part.")
        log.warning("%s", why)
        site.record_event(job.round, "refused", why=why)
        return RoundReply.failed(ERROR_DP_REQUIRED, "federation requires differential "
                                 "privacy; this site trains without it and refuses")
    why = _untrainable(job, privacy)
    if why is not None:  # refuse before loading data or building a model: at once
        log.error("%s", why)
        site.record_event(job.round, "refused", why=why)
        return RoundReply.failed(ex.ERROR_RECIPE, "this site's settings cannot train the "
                                 "federation's recipe")
    adopted = None
    if privacy is not None:  # before the ledger opens: no budget on an update the plan rules out
        fit = fit_to_plan(privacy, req.config)
        if fit.refuses:
            why = fit.refusal_text()
            log.warning("round %d: %s", job.round, why)
            site.record_event(job.round, "refused", why=why)
            return RoundReply.failed(ERROR_DP_PLAN, "site's DP settings do not fit the announced "
                                     "DP plan; it refuses before training")
        privacy, adopted = fit.privacy, fit.adopted_text()
        if adopted is not None:
            log.info("round %d: %s", job.round, adopted)
    torch.set_num_threads(job.recipe.ssl.threads)
    mem = _memory(site, req.run_id)
    runtime = Runtime.from_node_config(req.node_config)
    data = _site_data(site, mem, job, req.run_id)
    label = site.site_name or f"node-{req.node_id}"
    seed = ex.site_seed(job.recipe.ssl.seed, job.round, label)
    try:
        received = _received_state(req, job, mem)
    except codec.CodecError as e:
        log.warning("round %d: the global state did not decode (%s): refusing the round",
                    job.round, e)
        site.record_event(job.round, "refused", why=f"the global state did not decode: {e}")
        return RoundReply.failed(ERROR_EXCHANGE, "site could not decode the global state; "
                                 "see the site log")
    # Before training: the probe measures the global model this round starts from.
    probed = round_probe(req.node_config, req.config, job.recipe, received, privacy is not None)
    workers = usable_workers(job.recipe, runtime.workers)
    if workers < runtime.workers:
        log.warning("the federation's recipe has batches of %d (2D) and %d (3D) with "
                    "accumulate %d: %d of this site's %d workers can take part; training "
                    "with %d", job.recipe.ssl.batch_size_2d, job.recipe.ssl.batch_size_3d,
                    job.recipe.ssl.accumulate, workers, runtime.workers, workers)
        runtime = dataclasses.replace(runtime, workers=workers)
    if runtime.workers > 1 and privacy is None:  # several processes, one update
        t0 = time.perf_counter()
        public, state = run_local_data_parallel(
            job.recipe, job.total_steps, received, site.state_dir,
            job.start_step, job.local_steps, interval=job.round, runtime=runtime, seed=seed,
            scratch_root=site.state_dir / "rounds")
        public.setdefault(ex.SECONDS, time.perf_counter() - t0)
        site.record_position(job.round, job.start_step, job.local_steps, job.total_steps)
        site.record_event(job.round, "trained", **_shown(public))
        return _train_reply(site, mem, job, received, {**public, **probed}, state)
    try:
        step, guard = training_mode(job.recipe, privacy, site.state_dir, data, job.local_steps)
    except LedgerError:
        log.exception("privacy ledger unusable: refusing to train (fail closed)")
        site.record_event(job.round, "refused", why="the privacy ledger is unreadable; "
                          "restore STATE/privacy_ledger.json from its backup")
        return RoundReply.failed(ERROR_LEDGER, "site privacy ledger unreadable; site refuses "
                                 "to train until it is restored")
    engine = _engine(mem, job, runtime, step)
    engine.load_exchange_state(received)
    torch.manual_seed(seed)
    local = run_local(engine, data, job.start_step, job.local_steps, guard, interval=job.round)
    if not local.trained:  # the budget refused: metrics only, nothing trained
        site.record_event(job.round, "refused", why="the privacy budget is spent")
        return RoundReply(local.public, site_name=site.site_name)
    site.record_position(job.round, job.start_step, job.local_steps, job.total_steps)
    site.record_event(job.round, "trained", **_shown(local.public),
                      **({"adopted": adopted} if adopted is not None else {}))
    return _train_reply(site, mem, job, received, {**local.public, **probed},
                        engine.exchange_state())


def _evaluate(req: RoundRequest) -> RoundReply:
    if site_privacy(req.node_config) is not None:  # an un-noised loss is not covered
        log.info("evaluation request declined: this site releases only DP-trained state")
        return RoundReply.failed(ERROR_DP_EVALUATE, "DP site: local evaluation metrics are "
                                 "not released")
    try:
        job = Instruction.from_config(req.config)
    except codec.CodecError as e:
        log.warning("evaluation refused: %s", e)
        return RoundReply.failed(ERROR_EXCHANGE, "site cannot honour the announced exchange "
                                 "codec; see the site log")
    torch.set_num_threads(job.recipe.ssl.threads)
    site = SiteState.from_node_config(req.node_config)
    mem = _memory(site, req.run_id)
    data = _site_data(site, mem, job, req.run_id)
    runtime = Runtime.from_node_config(req.node_config)
    engine = _engine(mem, job, runtime, None)
    engine.load_exchange_state(_received_state(req, job, mem))
    result = engine.evaluate(data, job.eval_batches)
    metrics = {ex.LOSS: float(result["loss"]), ex.NUM_EXAMPLES: int(result.get("batches", 1))}
    return RoundReply(metrics, site_name=site.site_name)


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


def _shown(public: dict[str, float]) -> dict[str, float]:
    """What the site's terminal line shows of a round it trained."""
    keys = (ex.STEPS, ex.LOSS_2D, ex.LOSS_3D, ex.SECONDS, "epsilon")
    return {k: public[k] for k in keys if k in public}


def _record_failure(req: RoundRequest, e: Exception) -> None:
    """Best effort: the site's terminal line for a round that failed."""
    try:
        SiteState.from_node_config(req.node_config).record_event(
            int(req.config.get(ex.ROUND, 0)), "failed", why=f"{type(e).__name__}: {e}")
    except Exception:  # noqa: BLE001 - progress display must never stop a reply
        log.debug("progress not recorded", exc_info=True)


def handle(req: RoundRequest) -> RoundReply:
    """Run one message; never raises (a failure is an error reply with a fixed text)."""
    try:
        if req.kind == ex.TRAIN:
            return _train(req)
        if req.kind == ex.EVALUATE:
            return _evaluate(req)
        return RoundReply.failed(ERROR_TRAIN, "unknown message type")
    except Exception as e:  # noqa: BLE001 - a site must answer, never crash, on any failure
        if req.kind == ex.EVALUATE:
            log.exception("evaluation failed in this round")
            return RoundReply.failed(ERROR_EVALUATE, "site could not evaluate; see the site log")
        log.exception("training failed in this round")
        _record_failure(req, e)
        return RoundReply.failed(ERROR_TRAIN, "site could not train this round; see the site log")


def state_dir_of(node_config: dict[str, Any]) -> Path | None:
    value = node_config.get(ex.NODE_STATE_DIR)
    return Path(value) if isinstance(value, str) and value else None
