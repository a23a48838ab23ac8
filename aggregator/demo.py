"""``fed-unimiss demo``: a whole federation on loopback, over real gRPC + TLS, on built-in data.

What it does, in the order a consortium would:

1. writes phantom data for three sites: A has CT only, B X-rays only, C both;
2. provisions a CA, the coordinator's certificate and one key per site (``provision``);
3. starts the aggregator (SuperLink with TLS and site authentication) and three
   ``fed-unimiss site start`` processes, exactly as a coordinator and three hospitals would;
4. runs N rounds of federated pretraining of the ``micro`` model, streaming progress;
5. stops everything (no process is left behind) and prints where checkpoints, rounds.jsonl and
   logs are, with a per-round table.

Every demo gets a fresh timestamped folder under ``--workdir``; nothing existing is touched or
deleted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["register", "DemoLayout", "prepare_demo", "run_demo", "write_federation_yaml", "SITES"]

log = logging.getLogger(__name__)

# site -> (CT volumes, X-rays): one CT-only, one X-ray-only and one mixed hospital.
SITES: dict[str, tuple[int, int]] = {"A": (2, 0), "B": (0, 6), "C": (1, 3)}
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class DemoLayout:
    root: Path
    data: dict[str, Path]
    kits: Path
    federation: Path
    run: Path
    logs: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_federation_yaml(
    path: Path, *, min_sites: int, round_timeout: float, local_steps: int = 2,
    evaluate: bool = False,
) -> Path:
    """A federation config derived from configs/federation/micro.yaml, for loopback runs.

    The recipe path is made absolute (the file is written elsewhere); ``evaluate: false`` keeps
    one exchange per round, which halves the coordination overhead on 2 cores.
    """
    src = REPO_CONFIGS / "federation" / "micro.yaml"
    cfg = yaml.safe_load(src.read_text())
    recipe = Path(cfg.get("recipe", "../pretrain/micro.yaml"))
    cfg["recipe"] = str(recipe if recipe.is_absolute() else (src.parent / recipe).resolve())
    cfg.update(local_steps=local_steps, min_sites=min_sites, round_timeout=round_timeout,
               evaluate=evaluate)
    path.write_text(f"# Derived from {src} by fed-unimiss (loopback run).\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def prepare_demo(workdir: Path, round_timeout: float = 300.0) -> DemoLayout:
    """Create a fresh demo folder with phantom data, kits and a federation config."""
    from aggregator.provision import provision
    from fed_unimiss.data.phantom import write_phantoms

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(workdir).expanduser().resolve() / f"demo-{stamp}"
    suffix = 1
    while root.exists():
        root = root.with_name(f"demo-{stamp}-{suffix}")
        suffix += 1
    root.mkdir(parents=True)
    data = {}
    for i, (site, (n_ct, n_xray)) in enumerate(SITES.items()):
        data[site] = root / "data" / f"site-{site}"
        write_phantoms(data[site], n_ct, n_xray, seed=100 + i)
    kits = root / "kits"
    provision(list(SITES), kits, server_names=["127.0.0.1"])
    # min_sites one below the number of sites: a round still closes if one site drops
    federation = write_federation_yaml(root / "federation.yaml", min_sites=len(SITES) - 1,
                                       round_timeout=round_timeout)
    return DemoLayout(root=root, data=data, kits=kits, federation=federation,
                      run=root / "run", logs=root / "logs")


def _site_command(layout: DemoLayout, site: str, fleet: str) -> list[str]:
    return [sys.executable, "-m", "fed_unimiss.cli.main", "site", "start",
            "--kit", str(layout.kits / f"site-{site}"), "--data", str(layout.data[site]),
            "--superlink", fleet, "--state-dir", str(layout.root / "sites" / site / "state")]


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'round':>5}  {'sites':<10} {'loss':>9}  {'seconds':>7}  {'MB in':>7}"]
    for r in rows:
        loss, secs, nbytes = r.get("loss"), r.get("seconds"), r.get("bytes_in")
        lines.append(
            f"{r.get('round', '?'):>5}  {','.join(map(str, r.get('sites', []))):<10} "
            f"{f'{loss:.4f}' if isinstance(loss, (int, float)) else '-':>9}  "
            f"{f'{secs:.1f}' if isinstance(secs, (int, float)) else '-':>7}  "
            f"{f'{nbytes / 1e6:.1f}' if isinstance(nbytes, (int, float)) else '-':>7}"
        )
    return "\n".join(lines)


def run_demo(workdir: Path, rounds: int, round_timeout: float = 300.0) -> int:
    """Run the demo; returns the exit code (0 when every round completed)."""
    from aggregator.cli import format_round
    from aggregator.deploy.control import ControlError
    from aggregator.deploy.runner import AggregatorOptions, run_aggregator
    from fed_unimiss.processes import ProcessSet

    t0 = time.monotonic()
    print(f"preparing phantom data and kits for sites {', '.join(SITES)} ...", flush=True)
    layout = prepare_demo(workdir, round_timeout)
    fleet = f"127.0.0.1:{free_port()}"
    control = f"127.0.0.1:{free_port()}"
    opts = AggregatorOptions(
        kit=layout.kits / "coordinator", config=layout.federation, rounds=rounds,
        out=layout.run, fleet_address=fleet, control_address=control,
        wait_for_sites=len(SITES),
    )
    with ProcessSet(layout.root / "pids") as sites:
        def start_sites() -> None:
            for site in SITES:
                sites.start(f"site-{site}", _site_command(layout, site, fleet),
                            layout.logs / f"site-{site}.log")
            print(f"started {len(SITES)} site processes; waiting for them to connect ...",
                  flush=True)

        try:
            outcome = run_aggregator(
                opts,
                on_ready=start_sites,
                on_started=lambda rid: print(f"run {rid} started: {rounds} round(s)", flush=True),
                on_round=lambda row, st: print(format_round(row, rounds, st), flush=True),
            )
        except ControlError as e:
            print(f"error: {e}\nsite logs: {layout.logs}", file=sys.stderr)
            return 1
    elapsed = time.monotonic() - t0
    print()
    print(_table(outcome.rounds))
    print()
    checkpoints = sorted(layout.run.glob("global_round_*.safetensors"))
    print(f"demo folder:    {layout.root}")
    print(f"checkpoints:    {layout.run} ({len(checkpoints)} file(s), last: "
          f"{checkpoints[-1].name if checkpoints else 'none'})")
    print(f"rounds.jsonl:   {layout.run / 'rounds.jsonl'}")
    print(f"logs:           {layout.run / 'logs'} (aggregator), {layout.logs} (sites), "
          f"{layout.root / 'sites'}/*/state/logs (SuperNodes)")
    print(f"total time:     {elapsed:.0f} s")
    if not outcome.ok:
        print(f"error: {outcome.error}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    return run_demo(Path(args.workdir), args.rounds, args.round_timeout)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="a whole federation on loopback with built-in data",
        description="Phantom data for three sites (CT only, X-ray only, both), a provisioned "
        "CA and kits, the aggregator and three site processes over gRPC with TLS and site "
        "authentication on 127.0.0.1, N rounds of the micro model, then a clean shutdown.",
    )
    p.add_argument("--workdir", default="demo-run",
                   help="parent folder; each demo writes a new demo-YYYYmmdd-HHMMSS inside")
    p.add_argument("--rounds", type=int, default=3,
                   help="federated rounds (default 3: a few minutes on 2 CPU cores)")
    p.add_argument("--round-timeout", type=float, default=300.0,
                   help="seconds a round waits for replies before closing without a site")
    p.set_defaults(func=_run)
