"""``aggregator start`` as a function: SuperLink up, sites registered, one run, progress, clean exit.

RUN layout written here (next to what the ServerApp writes: checkpoints and rounds.jsonl)::

    RUN/logs/superlink.log   SuperLink, SuperExec and ServerApp output
    RUN/pids/*.pid           PIDs of our children, so a crashed coordinator's leftovers are found
    RUN/logs/serverapp.log   the ServerApp's log: Flower's part fetched over the Control API,
                             ours (aggregator.*, fed_unimiss.*) written by the ServerApp itself
    RUN/.flwr/               private FLWR_HOME (nothing is written to ~/.flwr)
    RUN/aggregator.json      the latest run id and its status: waiting (for sites), started,
                             the final one, or stopped (by Ctrl-C or a signal), with the command
                             that resumes the run
    RUN/sites-online.json    the registered sites and which of them the SuperLink sees online,
                             refreshed every few seconds while the command runs

The loop polls the run's status over the Control API and tails rounds.jsonl for progress. The
run's outcome is its final status (``finished:completed``), never an exit code. On any exit
(normal, error, Ctrl-C, SIGTERM) the run is stopped and every process tree we started is ended,
including Flower's orphaned ``flwr-serverapp``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.deploy.control import (
    ControlClient,
    ControlError,
    InputError,
    RunState,
    load_site_public_key,
)
from aggregator.deploy.fab import CLIENTAPP, SERVERAPP, FabSpec, build_fab
from aggregator.deploy.superlink import (
    CoordinatorKit,
    flower_env,
    load_coordinator_kit,
    superlink_command,
)
from aggregator.run_status import process_record, stop_cause
from aggregator.run_summary import (  # light: `aggregator status` imports only these
    LAST_RUN,
    ONLINE_FILE,
    ROUNDS_LOG,
    STATE_FILE,
    RoundsTail,
    epsilon_spent,
    last_run_of_kit,
    read_rounds,
    run_summary,
)
from fed_unimiss.checkpoint import atomic_write_json
from fed_unimiss.exchange import (
    RUN_CONFIG,
    RUN_OUT,
    RUN_RESUME,
    RUN_ROSTER,
    RUN_ROUNDS,
    RUN_SITES,
)
from flower_layer.processes import ProcessSet, kill_recorded

__all__ = ["AggregatorOptions", "RunOutcome", "RoundsTail", "run_aggregator", "run_summary",
           "epsilon_spent", "read_rounds", "last_run_of_kit", "resume_command",
           "wait_timeout_message"]

log = logging.getLogger(__name__)


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
    # A resumed run first waits, up to this long, for the sites of its last complete round to
    # be online again (a site's SuperNode reconnects by itself after a coordinator restart, but
    # takes a while); then it goes on with those that are (0 = do not wait).
    resume_wait_s: float = 120.0
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


def _register_sites(client: ControlClient, kit: CoordinatorKit) -> None:
    for site, path in kit.site_keys.items():
        node = client.register_site(load_site_public_key(path), site)
        if node is None:
            log.info("site %s already registered", site)
        else:
            log.info("registered site %s (node %d)", site, node)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Flower colours its log lines unconditionally


def _save_server_log(client: ControlClient, run_id: int, after: float, logs: Path) -> float:
    text, latest = client.fetch_logs(run_id, after)
    text = ANSI.sub("", text)
    if text:
        with open(logs / "serverapp.log", "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
    return latest


class OnlineRecord:
    """Which registered sites the SuperLink sees online, kept in RUN/sites-online.json.

    ``aggregator status`` and the dashboard run in other processes and must answer without
    Flower; they read this file, and trust it only while the process that wrote it lives.
    Only the kit's site labels are written: no node id, key or address.
    """

    def __init__(self, client: ControlClient, registered: list[str], out: Path,
                 every_s: float = 5.0) -> None:
        self.client, self.registered, self.path = client, sorted(registered), out / ONLINE_FILE
        self.every_s = every_s
        self._last = 0.0

    def poll(self) -> set[str]:
        """Ask the SuperLink now; record and return the registered sites online."""
        online = self.client.online_sites() & set(self.registered)
        atomic_write_json(self.path, {"at": time.time(), "registered": self.registered,
                                      "online": sorted(online), **process_record()})
        self._last = time.monotonic()
        return online

    def maybe_poll(self) -> None:
        """Refresh the record when it is older than ``every_s`` (a failed ask waits its turn)."""
        if time.monotonic() - self._last < self.every_s:
            return
        try:
            self.poll()
        except ControlError as e:
            self._last = time.monotonic()
            log.debug("could not list the SuperNodes: %s", e)


def _online_note(online: set[str], needed: int, waited: float) -> str:
    return (f"waiting for sites: {len(online)} of {needed} online "
            f"({', '.join(sorted(online)) or 'none yet'}) after {waited:.0f} s")


def wait_timeout_message(online: set[str], registered: list[str], needed: int,
                         timeout_s: float) -> str:
    """Why ``--wait-for-sites`` gave up, naming the sites that did not come (what to chase)."""
    missing = sorted(set(registered) - online)
    return (f"only {len(online)} of {needed} site(s) came online within {timeout_s:.0f} s; "
            f"not online: {', '.join(missing) or 'none'} "
            f"(online: {', '.join(sorted(online)) or 'none'})")


def _wait_online(sites: OnlineRecord, opts: AggregatorOptions, procs: ProcessSet,
                 note: Callable[[str], None]) -> None:
    """Block until ``opts.wait_for_sites`` sites are online; say how many are, as it changes."""
    started = time.monotonic()
    deadline = started + opts.wait_for_sites_timeout_s
    online: set[str] = set()
    shown: tuple[set[str], float] | None = None
    while time.monotonic() < deadline:
        online = sites.poll()
        if len(online) >= opts.wait_for_sites:
            note(f"{len(online)} site(s) online: {', '.join(sorted(online))}")
            return
        now = time.monotonic()
        # a line when the set changes, and every 30 s so a long wait never looks stuck
        if shown is None or online != shown[0] or now - shown[1] >= 30.0:
            note(_online_note(online, opts.wait_for_sites, now - started))
            shown = (online, now)
        procs.watch()
        time.sleep(0.5)
    raise ControlError(wait_timeout_message(online, sites.registered, opts.wait_for_sites,
                                            opts.wait_for_sites_timeout_s))


def _wait_for_last_sites(sites: OnlineRecord, wanted_sites: list[str], last_round: int,
                         timeout_s: float, procs: ProcessSet, note: Callable[[str], None]) -> None:
    """A resume waits (bounded) for the sites of its last complete round, and says so."""
    wanted = set(wanted_sites)
    note(f"resuming after round {last_round}: waiting up to {timeout_s:.0f} s for its sites "
         f"({', '.join(sorted(wanted))}) to reconnect")
    deadline = time.monotonic() + timeout_s
    online: set[str] = set()
    while True:
        online = sites.poll() & wanted
        if online == wanted:
            note(f"all {len(wanted)} site(s) of round {last_round} online")
            return
        if time.monotonic() >= deadline:
            note(f"going on without {', '.join(sorted(wanted - online))}: not online after "
                 f"{timeout_s:.0f} s (online: {', '.join(sorted(online)) or 'none'})")
            return
        procs.watch()
        time.sleep(0.5)


def resume_command(opts: AggregatorOptions) -> str:
    """The command that resumes this run: the same kit, config, rounds and RUN (absolute)."""
    def path(p: Path) -> str:
        return str(Path(p).expanduser().resolve())

    args = ["fed-unimiss", "aggregator", "start", "--kit", path(opts.kit), "--config",
            path(opts.config), "--rounds", str(opts.rounds), "--out", path(opts.out)]
    if opts.fleet_address:
        args += ["--address", opts.fleet_address]
    if opts.control_address:
        args += ["--control-address", opts.control_address]
    return shlex.join(args)


def _ended_record(e: BaseException) -> dict[str, Any]:
    """aggregator.json's status when the command ends by an exception: a stop is not a failure."""
    cause = stop_cause(e)
    if cause is not None:
        return {"status": "stopped", "stopped_by": cause}
    return {"status": "interrupted" if isinstance(e, SystemExit) else "error", "error": str(e)}


def _check_resume(config: Path, out: Path, rounds: int) -> dict[str, Any] | None:
    """Refuse at once a resume whose config or --rounds differ; the last round's row, if any."""
    from aggregator.rounds import FederationRun
    from aggregator.run_store import ResumeError, RunStore

    try:
        identity = FederationRun.from_files(config, out, rounds).identity()
        last = RunStore(out).check_resumable(identity)
    except (ResumeError, ValueError) as e:  # ConfigError is a ValueError too
        raise InputError(str(e)) from None
    if not last:
        return None
    rows = [r for r in read_rounds(out) if r.get("round") == last]
    return rows[-1] if rows else {"round": last, "sites": []}


class _RoundPrinter(threading.Thread):
    """Hands every new rounds.jsonl row to ``on_round`` within a second of its being written.

    A thread of its own: the Control API calls of the status loop can block for a long time on a
    loaded machine, and a round line must not wait for them.
    """

    def __init__(self, tail: RoundsTail, on_round: Callable[[dict[str, Any], RunState | None],
                                                             None] | None) -> None:
        super().__init__(name="rounds-printer", daemon=True)
        self.tail, self.on_round = tail, on_round
        self.state: RunState | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    def flush(self) -> None:
        with self._lock:
            for row in self.tail.read_new():
                if self.on_round is not None:
                    self.on_round(row, self.state)

    def run(self) -> None:
        while not self._done.wait(0.5):
            self.flush()

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(timeout=5.0)
        self.flush()


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
    on_note: Callable[[str], None] | None = None,
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
        raise InputError(f"--config {config}: no such file")
    if opts.rounds < 1:
        raise InputError(f"--rounds must be at least 1, got {opts.rounds}")
    note = on_note or (lambda text: log.info("%s", text))
    # A resume with another config or --rounds is refused here, before anything starts.
    last_row = _check_resume(config, Path(opts.out).expanduser().resolve(), opts.rounds)
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
    # RUN_SITES: the kit's sites, so that each round names the registered ones it did not hear
    overrides = {RUN_CONFIG: str(config), RUN_OUT: str(out), RUN_ROUNDS: int(opts.rounds),
                 RUN_RESUME: True, RUN_SITES: ",".join(sorted(kit.site_keys)),
                 **opts.run_config}
    if (kit.root / "roster").is_dir():  # what exchange.up: secure plans its rounds with
        overrides.setdefault(RUN_ROSTER, str(kit.root / "roster"))
    fab, fab_hash = build_fab(FabSpec(run_config=overrides, serverapp=opts.serverapp,
                                      clientapp=opts.clientapp))
    superlink_log = logs / "superlink.log"
    printer = _RoundPrinter(RoundsTail(out / ROUNDS_LOG, skip_existing=True), on_round)
    state: RunState | None = None
    run_id: int | None = None
    base = {"rounds": opts.rounds, "resume_command": resume_command(opts), **process_record()}
    atomic_write_json(out / STATE_FILE, {**base, "run_id": None, "status": "waiting"})

    with ProcessSet(pids) as procs:
        link = procs.start("superlink", superlink_command(kit, fleet, control),
                           superlink_log, env=env, cwd=out)
        log.info("SuperLink starting: fleet %s, control %s, log %s", fleet, control, superlink_log)
        client = ControlClient(control, kit.ca)
        sites = OnlineRecord(client, list(kit.site_keys), out)
        try:
            client.wait_ready(opts.ready_timeout_s, alive=lambda: link.poll() is None)
            _register_sites(client, kit)
            if on_ready is not None:
                on_ready()
            if opts.wait_for_sites:
                _wait_online(sites, opts, procs, note)
            if last_row and last_row.get("sites") and opts.resume_wait_s > 0 \
                    and int(last_row["round"]) < opts.rounds:
                _wait_for_last_sites(sites, [str(s) for s in last_row["sites"]],
                                     int(last_row["round"]), opts.resume_wait_s, procs, note)
            run_id = client.start_run(fab)
            atomic_write_json(out / STATE_FILE, {**base, "run_id": run_id, "status": "started",
                                                 "fab_sha256": fab_hash})
            log.info("run %d started (%d rounds, RUN %s)", run_id, opts.rounds, out)
            if on_started is not None:
                on_started(run_id)
            submitted = time.monotonic()
            failures, log_after = 0, 0.0
            printer.start()
            while True:
                procs.watch()
                sites.maybe_poll()
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
                printer.state = state
                if state.finished:
                    time.sleep(0.5)  # the ServerApp's last log lines arrive just after
                    printer.stop()
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
            atomic_write_json(out / STATE_FILE, {**base, "run_id": run_id, **_ended_record(e)})
            raise
        finally:
            if printer.is_alive():
                printer.stop()
            client.close()

    rounds = read_rounds(out)
    error = ""
    if not state.completed:
        server_log = logs / "serverapp.log"
        shown = server_log if server_log.exists() else superlink_log
        error = (f"run {run_id} ended {state.label()}"
                 + (f": {state.details}" if state.details else "")
                 + f"\n--- last lines of {shown} ---\n{_log_tail(shown, 15)}")
    atomic_write_json(out / STATE_FILE, {**base, "run_id": run_id, "status": state.label(),
                                         "details": state.details,
                                         "bytes_sent": state.bytes_sent,
                                         "bytes_recv": state.bytes_recv})
    return RunOutcome(state=state, rounds=rounds, error=error)
