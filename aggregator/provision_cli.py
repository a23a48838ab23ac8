"""``fed-unimiss provision``: create the consortium CA, certificates and one kit per party."""

from __future__ import annotations

import argparse
import sys

from aggregator.provision import DEFAULT_FLEET_PORT, ProvisionError, provision

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    names = [n for group in args.server_name or [] for n in group.split(",")]
    try:
        kits = provision(sites, args.out, server_names=names, fleet_port=args.fleet_port)
    except ProvisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"coordinator kit: {kits.coordinator}   (stays at the coordinator)")
    for site, path in kits.sites.items():
        print(f"site {site} kit:  {path}   (hand over to site {site} over a secure channel)")
    print(f"CA private key:  {kits.authority}   (keep offline; needed to add sites later)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "provision",
        help="create the consortium CA, certificates and kits",
        description="Create a consortium CA, the coordinator's TLS certificate and one EC key "
        "pair per site, written as one kit folder per party. Never overwrites an existing kit.",
    )
    p.add_argument("--sites", required=True,
                   help="comma-separated site names, e.g. A,B,C (letters, digits, - and _)")
    p.add_argument("--out", required=True, help="kits root folder (e.g. KITS); must be new")
    p.add_argument("--server-name", action="append", metavar="NAME",
                   help="DNS name or IP the sites dial to reach the coordinator; repeat for "
                   "several. localhost and 127.0.0.1 are always added. The first one goes into "
                   "the site templates.")
    p.add_argument("--fleet-port", type=int, default=DEFAULT_FLEET_PORT,
                   help=f"Fleet (gRPC) port written into the templates (default {DEFAULT_FLEET_PORT})")
    p.set_defaults(func=_run)
