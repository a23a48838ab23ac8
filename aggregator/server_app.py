"""The federation's Flower ServerApp (component reference ``aggregator.server_app:app``).

Run config keys (``flwr run --run-config`` in deployment; the in-process runner passes the
same): ``config`` (absolute path of the federation YAML, read here at the coordinator), ``out``
(absolute RUN directory), ``rounds`` and optionally ``resume``. See docs/federation.md.

Two things are added around the round loop here:

- the ServerApp's own log (the coordinator's ``aggregator.*``/``fed_unimiss.*`` loggers) is also
  written to ``RUN/logs/serverapp.log``: in deployment ``flwr-serverapp`` forwards only Flower's logger to
  the SuperLink, so without this the coordinator would never see why a reply was rejected. Only
  what these loggers already say goes there: node ids, site labels, counts and reasons, never
  text from a site's reply (the strategy records error codes, not error texts);
- ``require_dp: true`` (issue 7): :class:`RequireDPGrid` stamps every train instruction with
  ``require-dp`` (a non-DP site refuses, error 5103) and turns a train reply that reports no
  ``epsilon`` into the same error before the strategy sees it. That is a protocol check, not a
  proof: the aggregator trusts a site's report that it trained with DP (docs/privacy.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.serverapp import Grid, ServerApp

from aggregator.rounds import FederationRun, run_federation
from fed_unimiss import exchange as ex
from fed_unimiss.privacy.report import (
    DP_REFUSED,
    ERROR_DP_REQUIRED,
    REQUIRE_DP,
    reported_epsilon,
)

__all__ = ["app", "RequireDPGrid", "serverapp_log", "SERVERAPP_LOG", "COORDINATOR_LOGGERS"]

log = logging.getLogger(__name__)

SERVERAPP_LOG = "serverapp.log"  # under RUN/logs/, next to superlink.log
LOGGED_PACKAGES = ("aggregator", "fed_unimiss")
# Loggers whose records go to serverapp.log: the coordinator's own modules only. Site-side code
# (data cache, trainers, the in-process transport running ClientApps) runs in this process during
# `simulate` and logs file names; it must not reach the coordinator's file.
COORDINATOR_LOGGERS = ("aggregator.server_app", "aggregator.rounds", "aggregator.strategy",
                       "aggregator.averaging", "aggregator.validation", "aggregator.run_store",
                       "fed_unimiss.federation", "fed_unimiss.checkpoint", "fed_unimiss.config")


class _CoordinatorOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name in COORDINATOR_LOGGERS

app = ServerApp()


@contextmanager
def serverapp_log(out: str | Path, level: int = logging.INFO) -> Iterator[Path]:
    """Append the coordinator's loggers (:data:`COORDINATOR_LOGGERS`) to ``out/logs/serverapp.log``.

    Existing handlers (stdout, Flower's forwarding) are kept; the handler is removed on exit so
    that repeated in-process runs do not write to each other's files.
    """
    path = Path(out) / "logs" / SERVERAPP_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_CoordinatorOnly())
    loggers = [logging.getLogger(name) for name in LOGGED_PACKAGES]
    old_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > level:
            lg.setLevel(level)
    try:
        yield path
    finally:
        for lg, old in zip(loggers, old_levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(old)
        handler.close()


class RequireDPGrid(Grid):
    """A Grid that enforces ``require_dp`` on the wire (see the module docstring).

    Outgoing train messages get ``require-dp = True`` in their config record; a train reply
    without an error, a budget refusal or a finite ``epsilon`` is replaced by an error reply
    (code 5103) from the same node, which the strategy records as rejected.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._train: dict[str, Message] = {}  # pushed train messages awaiting a reply

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        self._grid.set_run(run_id)

    @property
    def run(self):  # type: ignore[override]
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == ex.TRAIN:
                msg.content.config_records[ex.CONFIG][REQUIRE_DP] = True
        ids = list(self._grid.push_messages(messages))
        for msg_id, msg in zip(ids, messages, strict=False):
            if msg_id and msg.metadata.message_type == ex.TRAIN:
                self._train[msg_id] = msg
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for reply in self._grid.pull_messages(message_ids):
            sent = self._train.pop(reply.metadata.reply_to_message_id, None)
            if sent is not None and not _reports_dp(reply):
                log.warning("node %d sent a train reply without DP (no epsilon) although the "
                            "federation requires DP: rejected", reply.metadata.src_node_id)
                reply = _dp_required_error(sent, reply)
            replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError("the round loop uses push_messages/pull_messages")


def _reports_dp(reply: Message) -> bool:
    """An error, a budget refusal, or a reply carrying the epsilon a DP site reports."""
    if reply.has_error():
        return True
    metrics = reply.content.metric_records.get(ex.METRICS)
    return metrics is not None and (metrics.get(DP_REFUSED) == 1
                                    or reported_epsilon(metrics) is not None)


def _dp_required_error(sent: Message, reply: Message) -> Message:
    error = Message(Error(ERROR_DP_REQUIRED, "federation requires differential privacy"),
                    reply_to=sent)
    # Message(reply_to=sent) already comes from sent's destination node; keep the reply's id.
    error.metadata.__dict__["_message_id"] = reply.metadata.message_id
    return error


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config, then run or resume every round (errors end the run non-zero)."""
    rc = context.run_config
    missing = [k for k in (ex.RUN_CONFIG, ex.RUN_OUT, ex.RUN_ROUNDS) if k not in rc]
    if missing:
        raise ValueError(
            f"run config lacks {', '.join(missing)}; pass e.g. --run-config "
            "'config=\"/abs/federation.yaml\" out=\"/abs/RUN\" rounds=3'"
        )
    rounds = rc[ex.RUN_ROUNDS]
    if isinstance(rounds, float) and rounds.is_integer():
        rounds = int(rounds)
    run = FederationRun.from_files(str(rc[ex.RUN_CONFIG]), str(rc[ex.RUN_OUT]), rounds)
    resume = bool(rc.get(ex.RUN_RESUME, False))
    with serverapp_log(run.out):
        if run.cfg.require_dp:
            log.info("federation requires differential privacy: non-DP sites are refused")
            grid = RequireDPGrid(grid)
        try:
            last = run_federation(grid, run, resume=resume)
        except Exception as e:
            log.error("federation stopped: %s", e)
            raise
        log.info("federation finished: %d round(s) in %s (last loss %s)", run.rounds, run.out,
                 last.get("loss"))
