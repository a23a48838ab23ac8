"""``fed-unimiss site start``: check this site's kit and data, then join the federation."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fed_unimiss.privacy.config import DP_KEYS
from site_client.supernode import (
    SiteError,
    check_site_data,
    load_site_kit,
    run_supernode,
    site_privacy_settings,
    site_runtime,
)

__all__ = ["register"]

log = logging.getLogger(__name__)


def _start(args: argparse.Namespace) -> int:
    try:
        kit = load_site_kit(args.kit)
        dests = [key.replace("-", "_") for key in DP_KEYS]
        privacy = site_privacy_settings(kit, {d: getattr(args, d, None) for d in dests})
        runtime = site_runtime(kit, args, privacy)
        summary = check_site_data(args.data)
        print(f"site {kit.settings.site_name}: data ok: {summary['ct_volumes']} CT volume(s), "
              f"{summary['xrays']} X-ray(s), {summary['rejected']} file(s) skipped "
              "(run `fed-unimiss data check` for details)", flush=True)
        if privacy.enabled:
            print(f"site {kit.settings.site_name}: differential privacy on: epsilon "
                  f"{privacy.target_epsilon:g} per patient over the whole federation, delta "
                  f"{privacy.target_delta:g}, clip {privacy.max_grad_norm:g}", flush=True)
        else:
            print(f"site {kit.settings.site_name}: differential privacy off "
                  "(--dp-epsilon E turns it on)", flush=True)
        print(f"site {kit.settings.site_name}: training on {runtime.torch_device()} in "
              f"{runtime.precision} with {runtime.workers} process(es)", flush=True)
        if args.check_only:
            return 0
        return run_supernode(
            kit, Path(args.data), superlink=args.superlink,
            state_dir=Path(args.state_dir) if args.state_dir else None,
            clientapp_port=args.clientapp_port, privacy=privacy, runtime=runtime,
            warm_worker=not args.no_worker,
        )
    except SiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


def _check(args: argparse.Namespace) -> int:
    from site_client.site_check import main

    return main(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("site", help="start a hospital's site client",
                              description="Commands run at a hospital site.")
    sub = p.add_subparsers(dest="site_command", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser(
        "start",
        help="check the data and the kit, then connect to the coordinator and take part",
        description="Checks the kit and the data folder, then runs Flower's SuperNode with TLS "
        "and this site's key until stopped (Ctrl-C / SIGTERM), waiting for the coordinator "
        "before and between its runs. Only outbound connections are made; only model weights "
        "and counts leave the site. Exit codes: 2 bad kit or data, 3 coordinator name does not "
        "resolve (or connect_timeout_s spent), 4 refused by the coordinator (key or "
        "certificate).",
    )
    s.add_argument("--kit", required=True, help="this site's kit folder (KITS/site-NAME)")
    s.add_argument("--data", required=True,
                   help="folder of DICOM series, NIfTI volumes and X-rays this site trains on")
    s.add_argument("--superlink", metavar="HOST:PORT",
                   help="coordinator address; default: `superlink` in the kit's site.yaml")
    s.add_argument("--state-dir", help="site-local state and logs; default: KIT/state")
    s.add_argument("--clientapp-port", type=int,
                   help="local port for the SuperNode's ClientApp API (loopback only); "
                   "default: a free one")
    s.add_argument("--no-worker", action="store_true",
                   help="run every round in Flower's fresh per-message process instead of the "
                   "site's warm worker (slower: each round imports torch and builds the model)")
    s.add_argument("--check-only", action="store_true",
                   help="check the kit and the data, then exit without connecting")
    hw = s.add_argument_group("hardware", "override site.yaml's device, precision and workers "
                              "(docs/site-guide.md, 'Hardware')")
    hw.add_argument("--device", metavar="DEV",
                    help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps")
    hw.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                    help="fp32, or bf16/fp16 forward passes with fp32 weights (not with DP)")
    hw.add_argument("--workers", type=int, metavar="N",
                    help="data-parallel processes per round, one GPU each on CUDA (not with DP)")
    dp = s.add_argument_group(
        "differential privacy (docs/privacy.md)",
        "Override the privacy section of the kit's site.yaml. The guarantee is per patient at "
        "this site, cumulative over every round and restart; the budget ledger lives in the "
        "state dir. Once spent, the site refuses further rounds.")
    dp.add_argument("--dp-epsilon", type=float, metavar="E",
                    help="turn DP on with this total epsilon per patient (e.g. 8)")
    dp.add_argument("--dp-delta", type=float, metavar="D",
                    help="target delta, well below 1/patients (default 1e-5)")
    dp.add_argument("--dp-clip", type=float, metavar="C",
                    help="per-patient L2 gradient clip (default 1.0)")
    dp.add_argument("--dp-noise-multiplier", type=float, metavar="S",
                    help="fixed noise multiplier (default: calibrated from the target)")
    dp.add_argument("--dp-planned-rounds", type=int, metavar="N",
                    help="rounds the budget is spread over (default 10)")
    dp.add_argument("--dp-patients-per-step", type=float, metavar="K",
                    help="expected patients per DP step (default 4); where the federation's "
                    "announced DP plan accepts fewer, the site trains with the plan's value")
    dp.add_argument("--dp-refuse-plan", dest="dp_adopt_plan", action="store_const",
                    const=False, default=None,
                    help="refuse a round (code 5105, before any budget is spent) instead of "
                    "adopting a DP plan that accepts fewer patients per step than this site's")
    s.set_defaults(func=_start)

    c = sub.add_parser(
        "check",
        help="check everything short of training: kit, data, hardware, disk, the way to the "
        "coordinator, the key's registration, the clock",
        description="One line per check (OK, WARN, FAIL, SKIP) with what to do; runs in "
        "seconds and joins no round. Exit codes as `site start`: 0 nothing failed, 2 kit, "
        "data, hardware or disk, 3 coordinator unreachable, 4 refused (certificate, key, "
        "clock). See docs/site-guide.md, 'Start here: site check'.",
    )
    c.add_argument("--kit", required=True, help="this site's kit folder (KITS/site-NAME)")
    c.add_argument("--data", required=True, help="the folder this site will train on")
    c.add_argument("--superlink", metavar="HOST:PORT",
                   help="coordinator address; default: `superlink` in the kit's site.yaml")
    c.add_argument("--state-dir", help="where the site will keep its state; default: KIT/state")
    c.add_argument("--device", metavar="DEV", help="as `site start --device`")
    c.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="as `site start --precision`")
    c.add_argument("--workers", type=int, metavar="N", help="as `site start --workers`")
    c.add_argument("--json", action="store_true", help="the checks as JSON on stdout")
    c.set_defaults(func=_check)
