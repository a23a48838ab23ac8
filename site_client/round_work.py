"""One round's work at a site, without Flower: the decisions around decode, train and encode.

The ClientApp (:mod:`site_client.client_app`) is a thin shim. In deployment it hands every
message to the site's warm worker (:mod:`site_client.worker`); under ``simulate`` it runs the
message in its own process. Either way the process keeps one :class:`SiteSessions` and calls
its :meth:`~SiteSessions.handle`: the site's :class:`~site_client.site_session.SiteSession`
holds what outlives a message (the exchange's base, residual and local teacher, the data index,
the trainer) and runs the round's steps; this module decides whether the site takes part at all
(announced exchange, DP requirement and plan, privacy ledger) and what its terminal shows.

Requests and replies are plain data (:class:`RoundRequest`, :class:`RoundReply`): numpy arrays,
numbers and short strings, so they cross the worker's local socket with no Flower object.
A reply carries only model-state tensors (and their int8 scales), numeric counts and metrics,
and at most the site's self-declared label; any failure becomes an error code with a fixed
text (the details, which may name local files, go to the site's own log only).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fed_unimiss import exchange as ex
from fed_unimiss.exchange_codec import CodecError
from fed_unimiss.privacy import ERROR_DP_REQUIRED, LedgerError
from fed_unimiss.privacy.report import ERROR_DP_PLAN
from fed_unimiss.runtime import Runtime
from site_client import secure_site
from site_client.dp_plan import fit_to_plan
from site_client.errors import ERROR_EVALUATE, ERROR_EXCHANGE, ERROR_TRAIN, ERROR_WORKER
from site_client.instruction import Instruction
from site_client.local_state import SiteState
from site_client.privacy_ledger import ERROR_DP_EVALUATE, ERROR_LEDGER, site_privacy
from site_client.probe_round import round_probe
from site_client.round_messages import RoundReply, RoundRequest
from site_client.site_session import SiteSession

__all__ = ["RoundRequest", "RoundReply", "SiteSessions", "handle", "ERROR_TRAIN",
           "ERROR_EVALUATE", "ERROR_EXCHANGE", "ERROR_WORKER"]

log = logging.getLogger(__name__)


class SiteSessions:
    """The site sessions of one process (the warm worker's, or the ClientApp's own), one per
    state directory."""

    def __init__(self) -> None:
        self.sessions: dict[str, SiteSession] = {}

    def session(self, req: RoundRequest) -> SiteSession:
        """The session of the site that ``req`` runs at (a new one the first time)."""
        key = str(req.node_config.get(ex.NODE_STATE_DIR, ""))
        if key not in self.sessions:
            self.sessions[key] = SiteSession(Path(key))
        return self.sessions[key]

    def handle(self, req: RoundRequest) -> RoundReply:
        """Run one message in its site's session; never raises (see :func:`handle`)."""
        return handle(self.session(req), req)


_CANNOT_HONOUR = "site cannot honour the announced exchange codec; see the site log"


def _refusal(site: SiteState, job: Instruction, why: str, code: int, text: str,
             level: int = logging.WARNING) -> RoundReply:
    """Say why on the site's log and terminal; reply the code with a fixed text."""
    log.log(level, "round %d: %s", job.round, why)
    site.record_event(job.round, "refused", why=why)
    return RoundReply.failed(code, text)


def _admit(job: Instruction, req: RoundRequest, site: SiteState
           ) -> tuple[Any, str | None, RoundReply | None]:
    """(privacy settings, the DP plan adopted, None) when this site may train the round, or
    (.., .., refusal) when it must refuse before loading data or building a model."""
    privacy = site_privacy(req.node_config)
    if privacy is None and job.require_dp:  # never release a non-private update
        return None, None, _refusal(
            site, job, "the federation requires differential privacy and this site has none "
            "configured: refusing to train. Restart the site with --dp-epsilon E (or a "
            "privacy section in site.yaml) to take part.", ERROR_DP_REQUIRED,
            "federation requires differential privacy; this site trains without it and refuses")
    why = _untrainable(job, privacy)
    if why is not None:
        return None, None, _refusal(site, job, why, ex.ERROR_RECIPE, "this site's settings "
                                    "cannot train the federation's recipe", logging.ERROR)
    if privacy is None:
        return None, None, None
    fit = fit_to_plan(privacy, req.config)  # before the ledger opens: no budget spent on it
    if fit.refuses:
        return None, None, _refusal(
            site, job, fit.refusal_text(), ERROR_DP_PLAN,
            "site's DP settings do not fit the announced DP plan; it refuses before training")
    adopted = fit.adopted_text()
    if adopted is not None:
        log.info("round %d: %s", job.round, adopted)
    return fit.privacy, adopted, None


def _train(session: SiteSession, req: RoundRequest) -> RoundReply:
    try:
        job = Instruction.from_config(req.config)
    except CodecError as e:
        log.warning("the federation announced an exchange this site cannot honour (%s): "
                    "refusing the round; update fed-unimiss at this site", e)
        return RoundReply.failed(ERROR_EXCHANGE, _CANNOT_HONOUR)
    site = SiteState.from_node_config(req.node_config)
    privacy, adopted, refused = _admit(job, req, site)
    if refused is not None:
        return refused
    torch.set_num_threads(job.recipe.ssl.threads)
    data = session.data(site, job, req.run_id)
    try:
        received = session.decode(req, job)
    except CodecError as e:
        return _refusal(site, job, f"the global state did not decode: {e}", ERROR_EXCHANGE,
                        "site could not decode the global state; see the site log")
    # Before training: the probe measures the global model this round starts from.
    probed = round_probe(req.node_config, req.config, job.recipe, received, privacy is not None)
    seed = ex.site_seed(job.recipe.ssl.seed, job.round, site.site_name or f"node-{req.node_id}")
    try:
        trained = session.train(site, job, received, data, privacy,
                                Runtime.from_node_config(req.node_config), seed)
    except LedgerError:
        log.exception("privacy ledger unusable: refusing to train (fail closed)")
        site.record_event(job.round, "refused", why="the privacy ledger is unreadable; "
                          "restore STATE/privacy_ledger.json from its backup")
        return RoundReply.failed(ERROR_LEDGER, "site privacy ledger unreadable; site refuses "
                                 "to train until it is restored")
    if trained.state is None:  # the budget refused: metrics only, nothing trained
        site.record_event(job.round, "refused", why="the privacy budget is spent")
        return RoundReply(trained.public, site_name=site.site_name)
    site.record_position(job.round, job.start_step, job.local_steps, job.total_steps)
    site.record_event(job.round, "trained", **_shown(trained.public),
                      **({"adopted": adopted} if adopted is not None else {}))
    if job.exchange.masked:  # the update leaves only masked, in the stages that follow
        return secure_site.train_reply(session, site, req, {**trained.public, **probed},
                                       trained.state, received, seed)
    return session.encode(site, {**trained.public, **probed}, trained.state, received)


def _evaluate(session: SiteSession, req: RoundRequest) -> RoundReply:
    if site_privacy(req.node_config) is not None:  # an un-noised loss is not covered
        log.info("evaluation request declined: this site releases only DP-trained state")
        return RoundReply.failed(ERROR_DP_EVALUATE, "DP site: local evaluation metrics are "
                                 "not released")
    try:
        job = Instruction.from_config(req.config)
    except CodecError as e:
        log.warning("evaluation refused: %s", e)
        return RoundReply.failed(ERROR_EXCHANGE, _CANNOT_HONOUR)
    torch.set_num_threads(job.recipe.ssl.threads)
    site = SiteState.from_node_config(req.node_config)
    data = session.data(site, job, req.run_id)
    metrics = session.evaluate(job, session.decode(req, job), data,
                               Runtime.from_node_config(req.node_config))
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


def handle(session: SiteSession, req: RoundRequest) -> RoundReply:
    """Run one message in ``session``; never raises (a failure is an error reply with a fixed
    text)."""
    try:
        if req.kind == ex.TRAIN:
            return _train(session, req)
        if req.kind == ex.EVALUATE:
            return _evaluate(session, req)
        if req.kind == ex.SECURE_STAGE:
            return secure_site.stage_reply(session, req)
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
