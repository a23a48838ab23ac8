"""``aggregator start`` as a function: SuperLink up, sites registered, one run, progress, clean exit.

RUN layout written here (next to what the ServerApp writes: checkpoints and rounds.jsonl)::

    RUN/logs/superlink.log   SuperLink, SuperExec and ServerApp output
    RUN/pids/*.pid           PIDs of our children, so a crashed coordinator's leftovers are found
    RUN/logs/serverapp.log   the ServerApp's log: Flower's part fetched over the Control API,
                             ours (aggregator.*, fed_unimiss.*) written by the ServerApp itself
    RUN/.flwr/               private FLWR_HOME (nothing is written to ~/.flwr)
    RUN/aggregator.json      the latest run id and its final status

The loop polls the run's status over the Control API and tails rounds.jsonl for progress. The
run's outcome is its final status (``finished:completed``), never an exit code. On any exit
(normal, error, Ctrl-C, SIGTERM) the run is stopped and every process tree we started is ended,
including Flower's orphaned ``flwr-serverapp``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.deploy.control import ControlClient, ControlError, RunState, load_site_public_key
from aggregator.deploy.fab import CLIENTAPP, SERVERAPP, FabSpec, build_fab
from aggregator.deploy.superlink import (
    CoordinatorKit,
    flower_env,
    load_coordinator_kit,
    superlink_command,
)
from aggregator.run_status import STATUS_FILE, read_json, run_state
from fed_unimiss.checkpoint import atomic_write_json
from fed_unimiss.exchange import RUN_CONFIG, RUN_OUT, RUN_RESUME, RUN_ROUNDS
from fed_unimiss.processes import ProcessSet, kill_recorded

__all__ = ["AggregatorOptions", "RunOutcome", "RoundsTail", "run_aggregator", "run_summary",
           "epsilon_spent", "read_rounds", "last_run_of_kit", "round_costs"]

log = logging.getLogger(__name__)

ROUNDS_LOG = "rounds.jsonl"
STATE_FILE = "aggregator.json"
LAST_RUN = "last-run"  # in the coordinator kit: the RUN folder of the latest start


@dataclass(frozen=True)
class AggregatorOptions:
    """Everything ``aggregator start`` needs; paths may be relative (resolved here)."""

    kit: Path
    config: Path
    rounds: int
    out: Path
    fleet_address: str | None = None  # default: the kit's coordinator.yaml
    control_address: str | None = None  # default: the kit's coordinator.yaml
    # Extra run-config keys for the ServerApp (tests use them for short deadlines).
    run_config: dict[str, Any] = field(default_factory=dict)
    serverapp: str = SERVERAPP
    clientapp: str = CLIENTAPP
    extra_env: dict[str, str] = field(default_factory=dict)
    poll_s: float = 1.0
    max_status_failures: int = 30
    # Submit the run only once this many registered sites are online (0 = submit at once and
    # let the ServerApp's min_sites/round_timeout decide). The demo and tests use it so that
    # round 1 already includes every site.
    wait_for_sites: int = 0
    wait_for_sites_timeout_s: float = 120.0
    ready_timeout_s: float = 60.0
    # Give up when the run is still pending/starting after this long (a broken SuperExec
    # leaves runs pending forever instead of failing them).
    start_timeout_s: float = 120.0


@dataclass
class RunOutcome:
    """The end of ``run_aggregator``: final state and the rounds completed in RUN."""

    state: RunState | None
    rounds: list[dict[str, Any]]
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.state is not None and self.state.completed and not self.error


class RoundsTail:
    """Rows of RUN/rounds.jsonl not yet seen, by round number (a torn last line waits).

    Rows are told apart by their round, not by byte offsets: a resumed run repairs the file
    (rewrites it to its complete rounds) and then appends, so an offset taken before the repair
    can land in the middle of the next row and lose it.
    """

    def __init__(self, path: Path, skip_existing: bool = True) -> None:
        self.path = path
        self.seen: set[Any] = set()
        if skip_existing:
            self.seen = {self._key(row) for row in self._rows()}

    @staticmethod
    def _key(row: dict[str, Any]) -> Any:
        return row.get("round", json.dumps(row, sort_keys=True))

    def _rows(self) -> list[dict[str, Any]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        rows = []
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def read_new(self) -> list[dict[str, Any]]:
        rows = [row for row in self._rows() if self._key(row) not in self.seen]
        self.seen.update(self._key(row) for row in rows)
        return rows


def read_rounds(out: Path) -> list[dict[str, Any]]:
    return RoundsTail(Path(out) / ROUNDS_LOG, skip_existing=False).read_new()


def last_run_of_kit(kit: str | Path) -> Path | None:
    """The RUN folder the coordinator kit ``kit`` was last started with, if any."""
    marker = Path(kit) / LAST_RUN
    try:
        return Path(marker.read_text().strip())
    except OSError:
        return None


def run_summary(out: str | Path) -> dict[str, Any]:
    """What ``aggregator status`` shows: rounds done, sites seen, last loss, last run status."""
    out = Path(out)
    rows = read_rounds(out)
    sites: set[str] = set()
    for r in rows:
        sites.update(str(s) for s in r.get("sites", []) or [])
    epsilon = epsilon_spent(rows)
    state: dict[str, Any] = {}
    if (out / STATE_FILE).exists():
        try:
            state = json.loads((out / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
    done = max((int(r.get("round", 0)) for r in rows), default=0)
    target = state.get("rounds") or read_json(out / STATUS_FILE).get("rounds")
    target = target if isinstance(target, int) and not isinstance(target, bool) else None
    run_state_, why = run_state(out, done, target)  # also what the dashboard shows
    return {
        "out": str(out),
        "rounds_done": done,
        "sites_seen": sorted(sites),
        "last_loss": rows[-1].get("loss") if rows else None,
        "run_id": state.get("run_id"),
        "status": state.get("status", "never started" if not rows else "unknown"),
        "rounds_target": target,
        "epsilon": epsilon,
        "state": run_state_,
        "why": why,
        "screening": screening_summary(rows),
        "costs": round_costs(rows),
    }


def round_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 15: per round, its wall time, the exchange, and per site local seconds and bytes."""
    out = []
    for row in rows:
        if "bytes_up" not in row and "site_seconds" not in row:
            continue  # a row written before these fields existed
        out.append({"round": row.get("round"), "seconds": row.get("seconds"),
                    "exchange": row.get("exchange"),
                    "site_seconds": row.get("site_seconds") or {},
                    "bytes_down": row.get("bytes_down") or {},
                    "bytes_up": row.get("bytes_up") or {}})
    return out


def screening_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per site: the last round's update norm against the median, and every clip or rejection.

    From each rounds.jsonl row's ``decisions`` (issue 17); rows without them are skipped.
    """
    sites: dict[str, dict[str, Any]] = {}
    for row in rows:
        decisions = row.get("decisions")
        if not isinstance(decisions, dict):
            continue
        for site, d in decisions.items():
            if not isinstance(d, dict):
                continue
            entry = sites.setdefault(str(site), {"events": []})
            entry["last_round"] = row.get("round")
            entry["last_action"] = d.get("action")
            entry["norms"] = d.get("norms")
            entry["vs_median"] = d.get("vs_median")
            if d.get("action") in ("clipped", "rejected", "refused"):
                entry["events"].append({"round": row.get("round"), "action": d.get("action"),
                                        "reason": d.get("reason")})
    return dict(sorted(sites.items()))


def epsilon_spent(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per DP site, the latest epsilon it reported (cumulative, so the latest is the total).

    Read from the ``epsilon`` map of each rounds.jsonl row; malformed entries are skipped.
    """
    spent: dict[str, float] = {}
    for row in rows:
        eps = row.get("epsilon")
        if not isinstance(eps, dict):
            continue
        for site, value in eps.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                spent[str(site)] = float(value)
    return dict(sorted(spent.items()))


def _register_sites(client: ControlClient, kit: CoordinatorKit) -> None:
    for site, path in kit.site_keys.items():
        node = client.register_site(load_site_public_key(path), site)
        if node is None:
            log.info("site %s already registered", site)
        else:
            log.info("registered site %s (node %d)", site, node)


def _save_server_log(client: ControlClient, run_id: int, after: float, logs: Path) -> float:
    text, latest = client.fetch_logs(run_id, after)
    if text:
        with open(logs / "serverapp.log", "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
    return latest


def _wait_online(client: ControlClient, opts: AggregatorOptions, procs: ProcessSet) -> None:
    deadline = time.monotonic() + opts.wait_for_sites_timeout_s
    online: set[str] = set()
    while time.monotonic() < deadline:
        online = client.online_sites()
        if len(online) >= opts.wait_for_sites:
            log.info("%d site(s) online: %s", len(online), ", ".join(sorted(online)))
            return
        procs.watch()
        time.sleep(0.5)
    raise ControlError(f"only {len(online)} of {opts.wait_for_sites} site(s) came online within "
                       f"{opts.wait_for_sites_timeout_s:.0f} s ({', '.join(sorted(online)) or 'none'})")


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def run_aggregator(
    opts: AggregatorOptions,
    on_round: Callable[[dict[str, Any], RunState | None], None] | None = None,
    on_started: Callable[[int], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> RunOutcome:
    """Run one federation of ``opts.rounds`` rounds; returns when the run has finished.

    ``on_round(row, state)`` is called for each new rounds.jsonl row (with the run's byte
    counters at that moment); ``on_ready()`` once the SuperLink is up and the sites are
    registered (the demo starts its sites there); ``on_started(run_id)`` once the run is
    submitted.

    Raises:
        ConfigError: a bad kit, config path or address (message names it).
        ControlError: the SuperLink did not come up or refused a request.
    """
    kit = load_coordinator_kit(opts.kit)
    out = Path(opts.out).expanduser().resolve()
    config = Path(opts.config).expanduser().resolve()
    if not config.is_file():
        raise ControlError(f"--config {config}: no such file")
    if opts.rounds < 1:
        raise ControlError(f"--rounds must be at least 1, got {opts.rounds}")
    fleet = opts.fleet_address or kit.settings.fleet_address
    control = opts.control_address or kit.settings.control_address
    out.mkdir(parents=True, exist_ok=True)
    # so that `aggregator status --kit KIT` finds the latest RUN of this coordinator
    (kit.root / LAST_RUN).write_text(str(out) + "\n")
    logs, pids, flwr_home = out / "logs", out / "pids", out / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    leftovers = kill_recorded(pids)
    if leftovers:
        log.warning("stopped %d leftover process(es) of a previous aggregator in %s",
                    len(leftovers), out)
    # The Control API client reads FLWR_HOME (credential store) in this process too.
    os.environ["FLWR_HOME"] = str(flwr_home)
    env = flower_env(flwr_home)
    env.update(opts.extra_env)

    if read_rounds(out):
        log.info("RUN %s already holds rounds: the ServerApp resumes after the last one", out)
    overrides = {RUN_CONFIG: str(config), RUN_OUT: str(out), RUN_ROUNDS: int(opts.rounds),
                 RUN_RESUME: True, **opts.run_config}
    fab, fab_hash = build_fab(FabSpec(run_config=overrides, serverapp=opts.serverapp,
                                      clientapp=opts.clientapp))
    superlink_log = logs / "superlink.log"
    tail = RoundsTail(out / ROUNDS_LOG, skip_existing=True)
    state: RunState | None = None
    run_id: int | None = None

    with ProcessSet(pids) as procs:
        link = procs.start("superlink", superlink_command(kit, fleet, control),
                           superlink_log, env=env, cwd=out)
        log.info("SuperLink starting: fleet %s, control %s, log %s", fleet, control, superlink_log)
        client = ControlClient(control, kit.ca)
        try:
            client.wait_ready(opts.ready_timeout_s, alive=lambda: link.poll() is None)
            _register_sites(client, kit)
            if on_ready is not None:
                on_ready()
            if opts.wait_for_sites:
                _wait_online(client, opts, procs)
            run_id = client.start_run(fab)
            atomic_write_json(out / STATE_FILE, {"run_id": run_id, "status": "started",
                                                 "rounds": opts.rounds, "fab_sha256": fab_hash})
            log.info("run %d started (%d rounds, RUN %s)", run_id, opts.rounds, out)
            if on_started is not None:
                on_started(run_id)
            submitted = time.monotonic()
            failures, log_after = 0, 0.0
            while True:
                procs.watch()
                try:
                    state = client.run_status(run_id)
                    log_after = _save_server_log(client, run_id, log_after, logs)
                    failures = 0
                except ControlError as e:
                    # A SuperLink starved of CPU answers 500 now and then; only a persistent
                    # failure ends the command.
                    failures += 1
                    if failures >= opts.max_status_failures or link.poll() is not None:
                        raise
                    log.debug("run status unavailable (%d): %s", failures, e)
                    time.sleep(opts.poll_s)
                    continue
                for row in tail.read_new():
                    if on_round is not None:
                        on_round(row, state)
                if state.finished:
                    time.sleep(0.5)  # the ServerApp's last log lines arrive just after
                    for row in tail.read_new():
                        if on_round is not None:
                            on_round(row, state)
                    try:
                        _save_server_log(client, run_id, log_after, logs)
                    except ControlError:
                        pass
                    break
                if state.status in ("pending", "starting") and \
                        time.monotonic() - submitted > opts.start_timeout_s:
                    raise ControlError(
                        f"run {run_id} still {state.status} after {opts.start_timeout_s:.0f} s: "
                        f"the ServerApp did not start (see {superlink_log})")
                if link.poll() is not None:
                    raise ControlError(f"the SuperLink exited (code {link.returncode}) during "
                                       f"run {run_id}; see {superlink_log}")
                time.sleep(opts.poll_s)
        except BaseException as e:
            if run_id is not None and (state is None or not state.finished):
                try:
                    client.stop_run(run_id)
                    log.info("run %d stopped", run_id)
                except ControlError:
                    pass
            status = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "error"
            atomic_write_json(out / STATE_FILE, {"run_id": run_id, "status": status,
                                                 "rounds": opts.rounds, "error": str(e)})
            raise
        finally:
            client.close()

    rounds = read_rounds(out)
    error = ""
    if not state.completed:
        server_log = logs / "serverapp.log"
        shown = server_log if server_log.exists() else superlink_log
        error = (f"run {run_id} ended {state.label()}"
                 + (f": {state.details}" if state.details else "")
                 + f"\n--- last lines of {shown} ---\n{_log_tail(shown, 15)}")
    atomic_write_json(out / STATE_FILE, {"run_id": run_id, "status": state.label(),
                                         "rounds": opts.rounds, "details": state.details,
                                         "bytes_sent": state.bytes_sent,
                                         "bytes_recv": state.bytes_recv})
    return RunOutcome(state=state, rounds=rounds, error=error)
