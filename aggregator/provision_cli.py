"""``fed-unimiss provision``: create the consortium CA, certificates and one kit per party."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from aggregator.provision import DEFAULT_FLEET_PORT, ProvisionError, add_sites, provision

__all__ = ["register", "files_git_would_take"]


def files_git_would_take(out: Path) -> tuple[Path, list[str]] | None:
    """(work tree, files) when ``out`` lies in a git work tree and ``git add`` would take (or
    has taken) files of it; None outside a work tree, when they are all ignored, or without git.

    The kits hold the CA key and every site's private key: committed, they are in the
    repository's history for good.
    """
    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", "-C", str(out), *args], capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None

    top = git("rev-parse", "--show-toplevel")
    if top is None or top.returncode != 0 or not top.stdout.strip():
        return None
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", "--", ".")
    if listed is None or listed.returncode != 0:
        return None
    files = [line for line in listed.stdout.splitlines() if line.strip()]
    return (Path(top.stdout.strip()), files) if files else None


def _warn_if_in_git(out: Path) -> None:
    found = files_git_would_take(out)
    if found is None:
        return
    top, files = found
    try:
        pattern = f"/{out.resolve().relative_to(top.resolve())}/"
    except ValueError:  # a path git and Python spell differently: name the folder itself
        pattern = f"{out.name}/"
    print(f"warning: {out} is inside the git work tree {top} and not ignored there: "
          f"`git add` would commit its {len(files)} file(s), private keys included. Add "
          f"'{pattern}' to {top / '.gitignore'}, or keep the kits outside the repository.",
          file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    if bool(args.sites) == bool(args.add_sites):
        print("error: give --sites A,B,C (a new provisioning) or --add-sites D (to an existing "
              "one), not both", file=sys.stderr)
        return 2
    names = [n for group in args.server_name or [] for n in group.split(",")]
    try:
        if args.add_sites:
            added = [s.strip() for s in args.add_sites.split(",") if s.strip()]
            kits = add_sites(added, args.out)
        else:
            sites = [s.strip() for s in args.sites.split(",") if s.strip()]
            kits = provision(sites, args.out, server_names=names, fleet_port=args.fleet_port)
    except ProvisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _warn_if_in_git(Path(args.out))
    if args.add_sites:
        for site, path in kits.sites.items():
            print(f"site {site} kit:  {path}   (hand over to site {site} over a secure channel)")
        print(f"added to {kits.coordinator / 'coordinator.yaml'}; the next `aggregator start` "
              "registers the new site(s)")
        return 0
    print(f"coordinator kit: {kits.coordinator}   (stays at the coordinator)")
    for site, path in kits.sites.items():
        print(f"site {site} kit:  {path}   (hand over to site {site} over a secure channel)")
    print(f"CA private key:  {kits.authority}   (keep offline)")
    print(f"add sites later: fed-unimiss provision --add-sites D --out {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "provision",
        help="create the consortium CA, certificates and kits",
        description="Create a consortium CA, the coordinator's TLS certificate and one EC key "
        "pair per site, written as one kit folder per party. Never overwrites an existing kit.",
    )
    p.add_argument("--sites",
                   help="comma-separated site names, e.g. A,B,C (letters, digits, - and _)")
    p.add_argument("--add-sites", metavar="D,E",
                   help="add site kits to the provisioning in --out (same CA and coordinator "
                   "kit); restart `aggregator start` to register them")
    p.add_argument("--out", required=True,
                   help="kits root folder (e.g. KITS); must be new, except with --add-sites")
    p.add_argument("--server-name", action="append", metavar="NAME",
                   help="DNS name or IP the sites dial to reach the coordinator; repeat for "
                   "several. localhost and 127.0.0.1 are always added. The first one goes into "
                   "the site templates.")
    p.add_argument("--fleet-port", type=int, default=DEFAULT_FLEET_PORT,
                   help=f"Fleet (gRPC) port written into the templates (default {DEFAULT_FLEET_PORT})")
    p.set_defaults(func=_run)
