"""``fed-unimiss aggregator start|status``: run a federation at the coordinator, or inspect one."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from aggregator.dashboard.cli import add_dashboard_command, add_start_flags

__all__ = ["register", "format_round", "format_bytes"]

log = logging.getLogger(__name__)

# `aggregator start` exit codes, one rule (docs/coordinator-guide.md, "Exit codes"): 0 the run
# completed; 1 it started but did not complete (a round failed, the SuperLink died, the sites
# did not come online in time); 2 refused before anything started (bad kit, config, flags, or a
# resume that does not match RUN); 130 / 143 stopped by Ctrl-C / SIGTERM (fed_unimiss.cli.main,
# flower_layer.processes).
EXIT_FAILED = 1
EXIT_REFUSED = 2


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def kind_losses(row: dict[str, Any]) -> dict[str, float]:
    """The round's 2D and 3D losses apart: per kind, the mean of the sites' ``loss_2d`` /
    ``loss_3d`` weighted by their samples of that kind (the two differ in scale, so their mix
    in ``loss`` can hide the trend of either)."""
    out: dict[str, float] = {}
    for kind in ("2d", "3d"):
        pairs = [(m.get(f"loss_{kind}"), m.get(f"samples_{kind}") or 1)
                 for m in (row.get("per_site") or {}).values() if isinstance(m, dict)]
        pairs = [(v, n) for v, n in pairs if isinstance(v, (int, float))
                 and isinstance(n, (int, float)) and n > 0]
        if pairs:
            out[kind] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
    return out


def format_round(row: dict[str, Any], rounds: int | None, state: Any = None) -> str:
    """One progress line: round, sites replied, loss (per kind), bytes, and every site whose
    reply was not used with the aggregator's reason (a category, never a site's text)."""
    sites = row.get("sites") or []
    loss = row.get("loss")
    loss_s = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
    kinds = kind_losses(row)
    if kinds:
        loss_s += " (" + ", ".join(f"{k.upper()} {v:.3f}" for k, v in kinds.items()) + ")"
    of = f"/{rounds}" if rounds else ""
    text = (f"round {row.get('round', '?')}{of}: {len(sites)} site(s) replied "
            f"({', '.join(str(s) for s in sites) or 'none'}), loss {loss_s}")
    if "bytes_in" in row:  # what the ServerApp counted: replies in, instructions out
        sent = row.get("bytes_out_per_site")
        sent = sent * len(sites) if isinstance(sent, (int, float)) else None
        text += f", bytes in {format_bytes(row['bytes_in'])} / out {format_bytes(sent)}"
    elif state is not None and (state.bytes_sent or state.bytes_recv):
        text += (f", bytes sent {format_bytes(state.bytes_sent)} / "
                 f"received {format_bytes(state.bytes_recv)}")
    secs = row.get("seconds")
    if isinstance(secs, (int, float)):
        text += f", {secs:.1f} s"
    probe = row.get("probe")
    if isinstance(probe, dict):  # the global model this round started from, deepest stage
        from aggregator.probe_report import last_stage

        kinds = last_stage((probe.get("weighted") or {}).get("teacher")) or {}
        if all(isinstance(kinds.get(k), (int, float)) for k in ("knn", "linear")):
            text += (f", probe after {probe.get('after_rounds')} round(s): teacher k-NN "
                     f"{kinds['knn']:.3f} / linear {kinds['linear']:.3f}")
    rejected = row.get("rejected") or {}
    if isinstance(rejected, dict) and rejected:
        text += "; not used: " + "; ".join(f"{site} ({why})" for site, why in rejected.items())
    absent = row.get("absent") or []
    if absent:  # registered, but nothing came from them: offline, late, or no reply in time
        text += f"; absent: {', '.join(str(s) for s in absent)} (registered, no reply)"
    return text


def _start(args: argparse.Namespace) -> int:
    from aggregator.deploy.control import ControlError, InputError
    from aggregator.deploy.runner import AggregatorOptions, run_aggregator
    from fed_unimiss.config import ConfigError

    opts = AggregatorOptions(kit=Path(args.kit), config=Path(args.config), rounds=args.rounds,
                             out=Path(args.out), fleet_address=args.address,
                             control_address=args.control_address,
                             wait_for_sites=args.wait_for_sites,
                             wait_for_sites_timeout_s=args.wait_timeout)
    from aggregator.dashboard.cli import start_beside

    try:
        dashboard = start_beside(args)  # the live page beside the federation
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        outcome = run_aggregator(
            opts,
            on_round=lambda row, st: print(format_round(row, args.rounds, st), flush=True),
            on_started=lambda rid: print(f"run {rid} started; logs in {Path(args.out) / 'logs'}",
                                         flush=True),
            on_note=lambda text: print(text, flush=True),
        )
    except (ConfigError, InputError, FileNotFoundError) as e:  # refused before anything ran
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except ControlError as e:  # started, but the run could not go on (docs: exit codes)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if dashboard is not None:
            dashboard.stop()
    if not outcome.ok:
        print(f"error: {outcome.error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"run {outcome.state.run_id} completed: {len(outcome.rounds)} round(s) in "
          f"{Path(args.out).resolve()}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from aggregator.run_summary import last_run_of_kit, run_summary

    if args.out:
        out = Path(args.out)
    else:
        found = last_run_of_kit(args.kit)
        if found is None:
            print(f"error: --kit {args.kit}: this coordinator kit was never started "
                  "(no last-run record); pass --out RUN", file=sys.stderr)
            return EXIT_REFUSED
        out = found
    if not out.is_dir():
        print(f"error: --out {out}: no such RUN folder", file=sys.stderr)
        return EXIT_REFUSED
    summary = run_summary(out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    loss = summary["last_loss"]
    target = f"/{summary['rounds_target']}" if summary["rounds_target"] else ""
    print(f"RUN {summary['out']}")
    print(f"  rounds done: {summary['rounds_done']}{target}")
    if summary["rounds_done"]:
        missing = summary["sites_missing"]
        absent = summary["absent_last_round"]
        print(f"  sites:       {', '.join(summary['sites_last_round']) or 'none'} in round "
              f"{summary['rounds_done']}"
              + (f"; not in it: {', '.join(missing)} (seen in earlier rounds)" if missing else "")
              + (f"; absent from it: {', '.join(absent)}" if absent else ""))
    else:
        print("  sites:       none in a completed round yet")
    online = online_line(summary["sites_online"])
    if online:
        print(f"  online now:  {online}")
    print(f"  last loss:   {loss:.4f}" if isinstance(loss, (int, float)) else "  last loss:   -")
    print(f"  last run:    {summary['run_id'] or '-'} ({summary['status']})")
    why = f" ({summary['why']})" if summary["why"] else ""
    print(f"  state:       {summary['state']}{why}")
    eps = summary.get("epsilon") or {}
    spent = ", ".join(f"{site} {value:.3f}" for site, value in eps.items())
    print(f"  DP epsilon:  {spent} (per patient, spent so far)" if spent
          else "  DP epsilon:  - (no site reported differential privacy)")
    _print_screening(summary.get("screening") or {})
    _print_costs(summary.get("costs") or [])
    _print_probe(summary.get("probe") or [])
    return 0


def online_line(online: dict[str, Any], now: float | None = None) -> str | None:
    """Who the SuperLink sees online of the registered sites; None without a record (simulate)."""
    import time

    registered = online.get("registered") or []
    if not registered:
        return None
    of = f"of {len(registered)} registered ({', '.join(registered)})"
    if online.get("online") is None:
        last = ", ".join(online.get("last_online") or []) or "none"
        return f"unknown: the aggregator is not running (last seen online: {last})"
    names = online["online"]
    at = online.get("at")
    ago = (f"; SuperLink asked {max(0.0, (now or time.time()) - at):.0f} s ago"
           if isinstance(at, (int, float)) else "")
    return f"{', '.join(names) or 'none'}: {len(names)} {of}{ago}"


def _print_probe(series: list[dict[str, Any]]) -> None:
    """Per probed round: balanced accuracy of the deepest encoder stage, k-NN / linear, of the
    global teacher and student, weighted over the probing sites and per site."""
    from aggregator.probe_report import last_stage

    if not series:
        return
    print("  probe of the global model (balanced accuracy, deepest stage, k-NN / linear;")
    print("  teacher | student; weighted by probe items, then per site):")

    def pair(scores: Any) -> str:
        kinds = last_stage(scores) or {}
        return "/".join(f"{kinds[k]:.3f}" if isinstance(kinds.get(k), (int, float)) else "-"
                        for k in ("knn", "linear"))

    for p in series:
        w = p.get("weighted") or {}
        sites = "; ".join(f"{site} {pair(v.get('teacher'))} | {pair(v.get('student'))}"
                          for site, v in (p.get("per_site") or {}).items() if isinstance(v, dict))
        print(f"    round {p.get('round')} (after {p.get('after_rounds')}): "
              f"{pair(w.get('teacher'))} | {pair(w.get('student'))}; {sites}")


def _print_costs(costs: list[dict[str, Any]]) -> None:
    """Each round's wall time and exchange; per site local seconds and bytes down/up."""
    if not costs:
        return
    print(f"  round costs (exchange {costs[-1].get('exchange') or '-'}; per site: local "
          "training s, bytes down / up as sent):")
    for c in costs:
        secs = c.get("seconds")
        head = f"    round {c.get('round')}: {secs:.1f} s" if isinstance(secs, (int, float)) \
            else f"    round {c.get('round')}: - s"
        sites = sorted(set(c["site_seconds"]) | set(c["bytes_up"]))
        parts = []
        for site in sites:
            local = c["site_seconds"].get(site)
            local_s = f"{local:.1f} s" if isinstance(local, (int, float)) else "- s"
            parts.append(f"{site} {local_s} {format_bytes(c['bytes_down'].get(site))} / "
                         f"{format_bytes(c['bytes_up'].get(site))}")
        print(head + (": " + "; ".join(parts) if parts else ""))


def _print_screening(screening: dict[str, Any]) -> None:
    """Per site: update norm / round median (student, teacher, center), clips and rejections."""
    if not screening:
        return
    print("  updates (last round: norm / round median per part; teacher cosine to the others,")
    print("  and the lowest it had in a round it was accepted):")
    for site, s in screening.items():
        ratios = s.get("vs_median") or {}
        shown = " ".join(f"{p} {ratios[p]:.2f}x" if isinstance(ratios.get(p), (int, float))
                         else f"{p} -" for p in ("student", "teacher", "center"))
        if s.get("last_action") == "accepted" and s.get("norms") is None:  # up: secure
            shown = "update masked (secure aggregation: no per-site norms)"
        if s.get("cosine") is not None:
            shown += f", cosine {s['cosine']:+.3f}"
        lowest = s.get("lowest_accepted_cosine")
        if lowest:
            shown += f" (lowest {lowest['cosine']:+.3f}, round {lowest['round']})"
        print(f"    {site}: round {s.get('last_round')} {s.get('last_action')}, {shown}")
        for e in s.get("events", []):
            print(f"      round {e['round']}: {e['action']}: {e['reason']}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("aggregator", help="start or inspect the coordinator's aggregator",
                              description="Commands run at the coordinator.")
    sub = p.add_subparsers(dest="aggregator_command", metavar="SUBCOMMAND", required=True)

    s = sub.add_parser(
        "start",
        help="start the SuperLink and run N federated rounds",
        description="Starts Flower's SuperLink with TLS and site authentication, registers the "
        "kit's site keys, runs N rounds and stops. Re-running with the same --out resumes after "
        "the last complete round. Ctrl-C stops the run and every process cleanly. Exit codes: 0 "
        "completed, 1 started but did not complete, 2 refused before starting (bad input, or a "
        "resume that does not match RUN), 130/143 stopped by Ctrl-C/SIGTERM.",
    )
    s.add_argument("--kit", required=True, help="the coordinator kit (KITS/coordinator)")
    s.add_argument("--config", required=True, help="federation YAML (e.g. configs/federation/micro.yaml)")
    s.add_argument("--rounds", type=int, required=True, help="number of rounds in total")
    s.add_argument("--out", required=True,
                   help="RUN folder: checkpoints, rounds.jsonl, logs/. Reuse it to resume.")
    s.add_argument("--address", metavar="HOST:PORT",
                   help="Fleet address the sites connect to (default: fleet_address in the "
                   "kit's coordinator.yaml)")
    s.add_argument("--control-address", metavar="HOST:PORT",
                   help="local Control API address (default: control_address in coordinator.yaml)")
    s.add_argument("--wait-for-sites", type=int, default=0, metavar="N",
                   help="submit the run only once N sites are connected, so that round 1 "
                   "already has them (default 0: start at once; the federation's min_sites "
                   "and round_timeout then decide)")
    s.add_argument("--wait-timeout", type=float, default=600.0, metavar="S",
                   help="give up when fewer than --wait-for-sites sites are online after S "
                   "seconds (default 600)")
    add_start_flags(s)
    s.set_defaults(func=_start)

    st = sub.add_parser("status", help="rounds done, sites seen, last loss, DP epsilon spent per site of a RUN folder")
    which = st.add_mutually_exclusive_group(required=True)
    which.add_argument("--out", help="the RUN folder given to `aggregator start`")
    which.add_argument("--kit", help="the coordinator kit: show its latest RUN")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    add_dashboard_command(sub)
