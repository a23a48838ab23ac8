"""The federation's Flower ServerApp (component reference ``aggregator.server_app:app``).

Run config keys (``flwr run --run-config`` in deployment; the in-process runner passes the
same): ``config`` (absolute path of the federation YAML, read here at the coordinator), ``out``
(absolute RUN directory), ``rounds`` and optionally ``resume``, ``sites`` (the registered
site labels, comma-separated: each round then names the absent ones) and ``roster`` (the folder
of site identity public keys that ``exchange.up: secure`` needs). See docs/federation.md.

Two things are added around the round loop here:

- the ServerApp's own log (the coordinator's ``aggregator.*``/``fed_unimiss.*`` loggers) is also
  written to ``RUN/logs/serverapp.log``: in deployment ``flwr-serverapp`` forwards only Flower's logger to
  the SuperLink, so without this the coordinator would never see why a reply was rejected. Only
  what these loggers already say goes there: node ids, site labels, counts and reasons, never
  text from a site's reply (the strategy records error codes, not error texts).
- a round that failed its quorum (:class:`~aggregator.rounds.RoundFailed`) still ends the run
  as failed, but Flower logs it as one line with the reason, not as a traceback
  (:class:`StoppedRunOneLine`): it is an outcome the coordinator reads, not a bug.

``require_dp: true`` is enforced by the strategy (:mod:`aggregator.strategy`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from aggregator.rounds import FederationRun, RoundFailed, run_federation
from aggregator.run_status import recorded_status
from fed_unimiss import exchange as ex
from flower_layer.backoff import shorten_object_pull_backoff

__all__ = ["app", "serverapp_log", "SERVERAPP_LOG", "COORDINATOR_LOGGERS", "StoppedRunOneLine",
           "quiet_stopped_runs"]

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


class StoppedRunOneLine(logging.Filter):
    """Flower logs any exception that leaves the ServerApp with its traceback ("ServerApp raised
    an exception"), which ``aggregator start`` then shows from the log's tail. A round without
    enough valid replies is the federation's rule at work: one line with the reason, which
    already names every rejected site and why."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RoundFailed):
            record.msg, record.args = "ServerApp stopped the run: %s", (str(error),)
            record.exc_info, record.exc_text = None, None
        return True


def quiet_stopped_runs(logger: logging.Logger | None = None) -> None:
    """Install :class:`StoppedRunOneLine` on Flower's logger (once per process)."""
    logger = logger or logging.getLogger("flwr")
    if not any(isinstance(f, StoppedRunOneLine) for f in logger.filters):
        logger.addFilter(StoppedRunOneLine())


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
    quiet_stopped_runs()  # Flower logs the failure after main returns: the filter stays
    shorten_object_pull_backoff()  # replies' chunks: no 1-2-4 s waits between pulls
    resume = bool(rc.get(ex.RUN_RESUME, False))
    registered = ([s for s in str(rc[ex.RUN_SITES]).split(",") if ex.is_valid_site_name(s)]
                  if ex.RUN_SITES in rc else None)
    roster = None
    if run.cfg.exchange.masked:  # secure aggregation: every site's identity public key
        from fed_unimiss.secure_aggregation.keys import load_roster

        if ex.RUN_ROSTER not in rc:
            raise ValueError("exchange.up: secure needs the run config 'roster' (the coordinator "
                             "kit's roster/ folder)")
        roster = load_roster(str(rc[ex.RUN_ROSTER]))
    # RUN/status.json: running, then finished or failed and why (status and dashboard read it)
    with serverapp_log(run.out), recorded_status(run.out, run.rounds):
        if run.cfg.require_dp:
            log.info("federation requires differential privacy: non-DP sites are refused")
        if roster is not None:  # sites can compare the digest out of band (docs/privacy.md)
            from fed_unimiss.secure_aggregation.keys import roster_digest

            log.info("secure aggregation: roster of %d site(s), digest %s", len(roster),
                     roster_digest(roster))
        try:
            last = run_federation(grid, run, resume=resume, registered=registered,
                                  roster=roster)
        except Exception as e:
            log.error("federation stopped: %s", e)
            raise
        log.info("federation finished: %d round(s) in %s (last loss %s)", run.rounds, run.out,
                 last.get("loss"))
