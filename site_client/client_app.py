"""The site's Flower ClientApp (component reference ``site_client.client_app:app``): a thin shim.

The protocol, as it reads below: turn the message into plain data (:class:`RoundRequest`: the
instruction config and the wire arrays), have it run, and turn the :class:`RoundReply` back into
a message. Where it runs:

- in deployment, ``site start`` runs a warm worker (:mod:`site_client.worker`) and names its
  socket in the node config (``worker-socket``); the shim hands the round to it. This module
  imports neither torch nor the models, so the ``flwr-clientapp`` process Flower starts for
  every message stays short. If the worker dies during the round the reply is error
  :data:`ERROR_WORKER` (the round fails for this site; the worker is restarted);
- without a worker (``simulate``, tests) the round runs in this process, in its sessions
  (:func:`in_process_sessions`), whose memory persists between messages as well.

A train instruction may carry the coordinator's decision on this site's previous update, and
the run's last message (type ``query``) the decision on its last one: a rejected or clipped
update is said on the site's terminal and in its log (:mod:`site_client.verdicts`).

The work itself (decode, train with the one trainer plain or DP-SGD, encode) is a site
session's (:mod:`site_client.site_session`), run the same way by the worker and here
(:class:`site_client.round_work.SiteSessions`). A reply carries only model-state tensors (and
int8 scales), numeric counts and metrics, and at most the site's self-declared label; a failure
is an error reply with a fixed text.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fed_unimiss import exchange as ex
from fed_unimiss.checkpoint import append_jsonl
from flower_layer.backoff import shorten_object_pull_backoff
from site_client.errors import ERROR_EVALUATE, ERROR_EXCHANGE, ERROR_TRAIN, ERROR_WORKER
from site_client.local_state import PROGRESS_FILE
from site_client.round_messages import RoundReply, RoundRequest
from site_client.verdicts import heard_verdict

if TYPE_CHECKING:
    from site_client.round_work import SiteSessions

__all__ = ["app", "in_process_sessions", "ERROR_TRAIN", "ERROR_EVALUATE", "ERROR_EXCHANGE", "ERROR_WORKER"]

log = logging.getLogger(__name__)

app = ClientApp()
shorten_object_pull_backoff()  # this flwr-clientapp process pulls the instruction's chunks

TIMING_LOG = "shim-timing.jsonl"  # STATE/logs/: where a round's time went (site-local, numbers)

_IN_PROCESS: SiteSessions | None = None  # SiteSessions of the sites this process runs without a worker (simulate)


def in_process_sessions() -> SiteSessions:
    """The sessions of the sites whose rounds run in this process (built on first use: the
    shim itself stays free of the trainer's imports)."""
    global _IN_PROCESS
    if _IN_PROCESS is None:
        from site_client.round_work import SiteSessions

        _IN_PROCESS = SiteSessions()
    return _IN_PROCESS


def _process_start() -> float | None:
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # noqa: BLE001 - timing is informative only
        return None


def _record_progress(context: Context, round_num: object, event: str, why: str) -> None:
    """A line of the site's progress file (site_client/local_state.py) for its terminal."""
    state = context.node_config.get(ex.NODE_STATE_DIR)
    if not isinstance(state, str) or not state:
        return
    try:
        append_jsonl(os.path.join(state, PROGRESS_FILE),
                     {"round": round_num, "event": event, "why": why})
    except OSError:
        pass


def _record_timing(context: Context, entry: dict) -> None:
    """Append one line of timestamps (epoch seconds) to the site's own timing log."""
    state = context.node_config.get(ex.NODE_STATE_DIR)
    if not isinstance(state, str) or not state:
        return
    try:
        path = os.path.join(state, "logs", TIMING_LOG)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError:
        pass


def _hear_verdict(msg: Message, context: Context) -> None:
    """Say on this site's terminal and in its log if the coordinator rejected or clipped its
    last update (site_client/verdicts.py); never fails the message that carries it."""
    try:
        verdict = heard_verdict(msg.content.config_records[ex.CONFIG])
    except Exception:  # noqa: BLE001 - a malformed instruction is answered by the round itself
        return
    if verdict is None or not verdict.news:
        return
    log.warning("%s", verdict.line())
    _record_progress(context, verdict.round, verdict.action, verdict.reason)


def _request(kind: str, msg: Message, context: Context) -> RoundRequest:
    content = msg.content
    config = content.config_records[ex.CONFIG]
    record = content.array_records[ex.ARRAYS]
    return RoundRequest(kind, int(context.run_id), int(context.node_id),
                        dict(context.node_config), dict(config),
                        {name: record[name].numpy() for name in list(record.keys())})


def _site_name(context: Context) -> str | None:
    name = context.node_config.get(ex.NODE_SITE_NAME)
    return str(name) if ex.is_valid_site_name(name) else None


def _message(msg: Message, reply: RoundReply, site_name: str | None = None) -> Message:
    if reply.error is not None:  # the code, a fixed text and the site's label (no content)
        return Message(Error(int(reply.error[0]), ex.error_reason(site_name, str(reply.error[1]))),
                       reply_to=msg)
    content = RecordDict({ex.METRICS: MetricRecord(dict(reply.metrics))})
    if reply.arrays is not None:
        content[ex.ARRAYS] = ArrayRecord({k: Array(v) for k, v in reply.arrays.items()})
    if reply.scales:
        content[ex.SCALES] = ArrayRecord({k: Array(v) for k, v in reply.scales.items()})
    if reply.site_name is not None:
        content[ex.SITE] = ConfigRecord({ex.SITE_NAME_KEY: reply.site_name})
    return Message(content, reply_to=msg)


def _run(kind: str, msg: Message, context: Context) -> Message:
    timing = {"kind": kind, "node_id": int(context.node_id), "process_start": _process_start(),
              "handler_start": time.time()}
    fallback = ERROR_EVALUATE if kind == ex.EVALUATE else ERROR_TRAIN
    if kind == ex.TRAIN:  # the decision on this site's previous update comes first
        _hear_verdict(msg, context)
    try:
        request = _request(kind, msg, context)
        timing["round"] = request.config.get(ex.ROUND)
    except Exception:  # noqa: BLE001 - a malformed instruction still gets an answer
        log.exception("unreadable %s instruction", kind)
        return Message(Error(fallback, ex.error_reason(_site_name(context), "site could not "
                                                       "read the instruction")), reply_to=msg)
    socket = context.node_config.get(ex.NODE_WORKER_SOCKET)
    timing["work_start"] = time.time()
    if isinstance(socket, str) and socket:
        from site_client.worker import WorkerUnavailable, call

        try:
            reply = call(socket, request)
        except WorkerUnavailable as e:
            log.error("site worker unavailable: %s; this round fails for this site", e)
            _record_progress(context, timing.get("round"), "failed",
                             "the site's worker stopped during the round; it is restarted")
            reply = RoundReply.failed(ERROR_WORKER, "site worker stopped during the round; "
                                      "it is being restarted")
    else:
        reply = in_process_sessions().handle(request)
    timing["work_end"] = time.time()
    out = _message(msg, reply, _site_name(context))
    timing["end"] = time.time()
    timing["worker"] = bool(isinstance(socket, str) and socket)
    _record_timing(context, timing)
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train ``local_steps`` on local data from the received global state; reply the new state."""
    return _run(ex.TRAIN, msg, context)


@app.train("secure")
def secure_stage(msg: Message, context: Context) -> Message:
    """A stage of a secure round (``exchange.up: secure``) after its train instruction: share
    keys, masked input or unmask (site_client/secure_site.py)."""
    return _run(ex.SECURE_STAGE, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Self-distillation loss of the received global model on a few local batches."""
    return _run(ex.EVALUATE, msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The run's last word: the coordinator's decision on this site's last update. Nothing is
    trained and nothing is sent back but an empty acknowledgement."""
    _hear_verdict(msg, context)
    return Message(RecordDict(), reply_to=msg)
