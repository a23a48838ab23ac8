"""``fed-unimiss site check``: everything short of training, for hospital IT, in seconds.

One line per check, in the order a site meets them when it starts: its kit, its data, its
hardware, its disk, then the way to the coordinator (the name resolves, the port answers, the TLS
handshake verifies against the consortium's CA), whether the coordinator knows this site's key,
and whether this machine's clock is close enough to the coordinator's for its signed requests.
Each line is OK, WARN or FAIL, and a WARN or FAIL says what to do. A check that cannot run because
an earlier one failed is SKIP.

The exit code is the one ``site start`` would end with on the first failure
(docs/site-guide.md, "Exit codes"): 0 when nothing failed (warnings allowed), 2 kit, data,
hardware or disk, 3 the coordinator cannot be reached, 4 it refuses this site (certificate, key,
clock).

Nothing is trained and no round is joined. Asking whether the key is registered activates this
site's node at the coordinator for a moment and deactivates it (flower_layer/fleet_probe.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from site_client.reach import probe_coordinator
from site_client.supernode import (
    EXIT_BAD_INPUT,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    SiteError,
    SiteKit,
    check_site_data,
    load_site_kit,
    site_privacy_settings,
    site_runtime,
)

__all__ = ["Check", "run_checks", "exit_code", "main"]

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
MIN_FREE_BYTES = 1 << 30  # logs, the DP ledger, the worker's model: below 1 GiB a site fails


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""
    code: int = 0  # the exit code a FAIL here gives

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<10}  {self.detail}"
        return text + (f"\n                  fix: {self.fix}" if self.fix else "")


def _kit(kit_path: str) -> tuple[Check, SiteKit | None]:
    try:
        kit = load_site_kit(kit_path)
    except SiteError as e:
        return Check("kit", FAIL, str(e), "use the KITS/site-NAME folder the coordinator sent, "
                     "unchanged", EXIT_BAD_INPUT), None
    problems, fixes = [], []
    if kit.key.stat().st_mode & 0o077:
        problems.append(f"{kit.key} is readable by other users")
        fixes.append(f"chmod 600 {kit.key}")
    if not (kit.root / "roster").is_dir():
        problems.append("no roster/ (secure aggregation needs it)")
        fixes.append("ask the coordinator for the current kit")
    detail = f"site {kit.settings.site_name}: site.yaml, ca.crt and a key that matches site.pub"
    if problems:
        return Check("kit", WARN, detail + "; but " + "; ".join(problems), "; ".join(fixes)), kit
    return Check("kit", OK, detail), kit


def _data(data: str) -> Check:
    try:
        summary = check_site_data(data)
    except SiteError as e:
        return Check("data", FAIL, str(e), "point --data at the folder of DICOM series, NIfTI "
                     "volumes and X-rays; `fed-unimiss data check` lists every file's problem",
                     EXIT_BAD_INPUT)
    detail = (f"{summary['ct_volumes']} CT volume(s), {summary['xrays']} X-ray(s) usable, "
              f"{summary['rejected']} file(s) skipped")
    if summary["rejected"]:
        return Check("data", WARN, detail, "`fed-unimiss data check` says why each was skipped")
    return Check("data", OK, detail)


def _device(kit: SiteKit, args: argparse.Namespace) -> Check:
    try:
        privacy = site_privacy_settings(kit)
        runtime = site_runtime(kit, args, privacy)
    except SiteError as e:
        return Check("device", FAIL, str(e), "set device/precision in site.yaml to what this "
                     "machine has (docs/site-guide.md, 'Hardware')", EXIT_BAD_INPUT)
    return Check("device", OK, f"trains on {runtime.torch_device()} in {runtime.precision} with "
                 f"{runtime.workers} process(es)")


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                pass
    return total


def _disk(kit: SiteKit, state_dir: str | None, data: str) -> Check:
    state = Path(state_dir).expanduser() if state_dir else kit.root / kit.settings.state_dir
    existing = state.resolve()
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return Check("disk", FAIL, f"{existing} is not writable by this user (the state "
                     f"directory {state} lives there)", "run as the site's service user, or "
                     "pass --state-dir on a writable disk", EXIT_BAD_INPUT)
    free = shutil.disk_usage(existing).free
    need = _folder_bytes(Path(data).expanduser()) if Path(data).expanduser().is_dir() else 0
    detail = (f"{free / 2**30:.1f} GiB free for {state}; the site's cache takes up to about "
              f"twice the data's {need / 2**30:.2f} GiB")
    if free < MIN_FREE_BYTES:
        return Check("disk", FAIL, detail, "free space, or pass --state-dir on another disk",
                     EXIT_BAD_INPUT)
    if free < 2 * need + MIN_FREE_BYTES:
        return Check("disk", WARN, detail, "the cache may not fit: free space, or pass "
                     "--state-dir on another disk")
    return Check("disk", OK, detail)


def _coordinator(kit: SiteKit, superlink: str) -> list[Check]:
    """resolve, port, tls, registered and clock."""
    reach = probe_coordinator(superlink, kit.ca)
    host = superlink.rpartition(":")[0].strip("[]")
    skip = [Check(n, SKIP, "needs the line above") for n in ("port", "tls", "registered", "clock")]
    if reach.kind == "no-such-name" or "could not be looked up" in reach.detail:
        return [Check("resolve", FAIL, f"{host!r} does not resolve ({reach.detail})",
                      "check the address in site.yaml (or --superlink) and this machine's DNS",
                      EXIT_UNREACHABLE), *skip]
    resolved = Check("resolve", OK, f"{host} resolves")
    handshake = reach.kind == "waiting" and ("TLS handshake" in reach.detail
                                             or "during the TLS" in reach.detail)
    if reach.kind == "waiting" and not handshake:
        return [resolved, Check("port", FAIL, f"{superlink}: {reach.detail}",
                                "is the coordinator running? open outbound TCP to this port in "
                                "the firewall", EXIT_UNREACHABLE), *skip[1:]]
    port = Check("port", OK, f"{superlink} answers")
    if not reach.ok:
        fix = {"foreign-ca": "the kit is from another provisioning, or the address points at "
                             "another server: ask the coordinator for the current kit",
               "name-mismatch": "dial one of the names the coordinator provisioned its "
                                "certificate for",
               }.get(reach.kind, "ask the coordinator to check its certificate and SuperLink")
        return [resolved, port, Check("tls", FAIL, f"{reach.kind}: {reach.detail}", fix,
                                      EXIT_REFUSED), *skip[2:]]
    tls = Check("tls", OK, "the coordinator's certificate verifies against this kit's ca.crt")
    return [resolved, port, tls, *_fleet(kit, superlink)]


def _fleet(kit: SiteKit, superlink: str) -> list[Check]:
    from cryptography.hazmat.primitives import serialization

    from flower_layer.fleet_probe import CLOCK_AHEAD_S, CLOCK_BEHIND_S, probe_registration

    key = serialization.load_ssh_private_key(kit.key.read_bytes(), password=None)
    answer = probe_registration(superlink, kit.ca.read_bytes(), key)  # type: ignore[arg-type]
    window = f"within {CLOCK_AHEAD_S} s ahead and {CLOCK_BEHIND_S} s behind the coordinator"
    clock_ok = Check("clock", OK, f"the coordinator accepted this machine's signed time ({window})")
    if answer.kind == "registered":
        return [Check("registered", OK, "the coordinator knows this site's key"), clock_ok]
    if answer.kind == "not-activated":
        return [Check("registered", FAIL, "the coordinator refused this site's key: it is not "
                      "registered, or a SuperNode with this key is connected right now",
                      "if this site is running, that is the connection: stop it and check "
                      "again; otherwise ask the coordinator to register the site (`provision "
                      "--add-sites`, then the kit they send)", EXIT_REFUSED), clock_ok]
    if answer.kind == "clock":
        return [Check("registered", SKIP, "needs the clock below"),
                Check("clock", FAIL, f"the coordinator refused this machine's signed time: it "
                      f"must be {window}", "synchronise this machine's clock (NTP)",
                      EXIT_REFUSED)]
    code = EXIT_UNREACHABLE if answer.kind == "unreachable" else EXIT_REFUSED
    return [Check("registered", FAIL, f"the coordinator's Fleet API: {answer.detail}",
                  "send the coordinator this line", code),
            Check("clock", SKIP, "needs the line above")]


def run_checks(args: argparse.Namespace) -> list[Check]:
    """Every check of ``site check`` for the parsed arguments (``kit``, ``data``, ...)."""
    kit_check, kit = _kit(args.kit)
    checks = [kit_check, _data(args.data)]
    if kit is None:
        return checks + [Check(n, SKIP, "needs a kit") for n in
                         ("device", "disk", "resolve", "port", "tls", "registered", "clock")]
    checks += [_device(kit, args), _disk(kit, args.state_dir, args.data)]
    return checks + _coordinator(kit, args.superlink or kit.settings.superlink)


def exit_code(checks: list[Check]) -> int:
    """0 unless something failed; else the first failure's code."""
    return next((c.code for c in checks if c.status == FAIL), 0)


def main(args: argparse.Namespace) -> int:
    checks = run_checks(args)
    code = exit_code(checks)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "exit_code": code}, indent=1))
    else:
        for check in checks:
            print(check.line())
        failed = sum(c.status == FAIL for c in checks)
        warned = sum(c.status == WARN for c in checks)
        print(f"\n{failed} failed, {warned} warning(s): "
              + ("ready to start (`fed-unimiss site start`)" if not failed
                 else f"exit code {code}"), file=sys.stderr)
    return code
