"""``fed-unimiss aggregator dashboard`` and ``aggregator start --dashboard``: flags and start-up."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_dashboard_command", "add_start_flags", "start_beside", "TOKEN_ENV"]

TOKEN_ENV = "FED_UNIMISS_DASHBOARD_TOKEN"  # the token, kept out of `ps` listings
TOKEN_HELP = (f"the token every request must carry (at least 16 characters; default: ${TOKEN_ENV}, "
              "else one is generated when the address is not loopback, and printed)")


def _announce(server: Any) -> None:
    cfg = server.cfg
    print(f"dashboard of {cfg.out} on {server.url()}", flush=True)
    if cfg.token:
        print("  every request needs the token: open the link above once (the page keeps a "
              "cookie), or send 'Authorization: Bearer TOKEN' from scripts", flush=True)


def _make(out: Path, address: str, token: str | None, refresh: float) -> Any:
    from aggregator.dashboard.server import DashboardConfig, DashboardServer

    cfg = DashboardConfig.make(out, address, token or os.environ.get(TOKEN_ENV) or None, refresh)
    return DashboardServer(cfg)


def _serve(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: --out {out}: no such RUN folder", file=sys.stderr)
        return 2
    try:
        server = _make(out, args.address, args.token, args.refresh)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _announce_when_started(server)
    server.run()
    return 0 if server.server.started else 1


def _announce_when_started(server: Any) -> None:
    """Print the address once uvicorn listens (its port may have been chosen by the OS)."""
    import threading
    import time

    def wait() -> None:
        while not server.server.started and not server.server.should_exit:
            time.sleep(0.05)
        if server.server.started:
            _announce(server)

    threading.Thread(target=wait, name="dashboard-announce", daemon=True).start()


def start_beside(args: argparse.Namespace) -> Any:
    """For ``aggregator start --dashboard ADDRESS``: serve RUN from a thread; None if not asked.

    Raises:
        ValueError: a bad address or token (the message names the flag).
        OSError: the address cannot be listened on.
    """
    if not getattr(args, "dashboard", None):
        return None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    server = _make(Path(args.out), args.dashboard, args.dashboard_token, 3.0)
    server.start()
    _announce(server)
    return server


def add_start_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dashboard", metavar="HOST:PORT",
                        help="also serve the live dashboard of this RUN there (e.g. "
                        "127.0.0.1:8050; another host than loopback needs a token)")
    parser.add_argument("--dashboard-token", metavar="TOKEN", help=TOKEN_HELP)


def add_dashboard_command(sub: argparse._SubParsersAction) -> None:
    from aggregator.dashboard.server import DEFAULT_ADDRESS

    d = sub.add_parser(
        "dashboard",
        help="serve a live, read-only web page (and JSON API) of a RUN folder",
        description="Serves the run's state, rounds, sites and plots over rounds from RUN "
        "(an `aggregator start` or `simulate` run, running or finished); the page updates "
        "itself. JSON: /api/run, /api/rounds, /api/sites. It binds to 127.0.0.1 unless told "
        "otherwise; on any other address every request needs the token.",
    )
    d.add_argument("--out", required=True, help="the RUN folder of `aggregator start` or `simulate`")
    d.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                   help=f"where to listen (default {DEFAULT_ADDRESS}; 0.0.0.0:8050 for every "
                   "interface, then a token is required)")
    d.add_argument("--token", help=TOKEN_HELP)
    d.add_argument("--refresh", type=float, default=3.0, metavar="S",
                   help="how often the page asks for new rounds (default 3 s; rounds of a "
                   "real federation take minutes, so a larger value costs nothing)")
    d.set_defaults(func=_serve)
