"""Deployment benchmark: wall time per round on loopback, split into site compute and coordination.

A real deployment on 127.0.0.1 (provisioned CA and keys, SuperLink with TLS and site
authentication, two ``fed-unimiss site start`` processes on phantom X-ray data) runs a few rounds
of the real ServerApp/ClientApp per model preset. From RUN/rounds.jsonl:

- round wall time: the ServerApp's ``seconds`` for the round (push to last reply);
- site compute: the slowest site's own ``seconds`` (the local training loop, timed in the
  ClientApp);
- coordination overhead = round - site compute: Flower's polling (the SuperNode's 3 s idle
  loop), starting a ``flwr-clientapp`` process per message (imports, model build, cache open),
  serialization and transfer.

Usage::

    .venv/bin/python benchmarks/bench_deploy.py --presets micro tiny --rounds 3

Results replace the "## Deployment (issue 6)" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Deployment (issue 6)"


def _federation_yaml(path: Path, preset: str, local_steps: int) -> Path:
    from aggregator.demo import write_federation_yaml

    write_federation_yaml(path, min_sites=2, round_timeout=1800, local_steps=local_steps)
    if preset != "micro":  # same federation and recipe overrides as micro, the preset's recipe
        path.write_text(path.read_text().replace("pretrain/micro.yaml", f"pretrain/{preset}.yaml"))
    return path


def bench_preset(preset: str, rounds: int, local_steps: int, work: Path) -> dict:
    from aggregator.deploy.runner import AggregatorOptions, run_aggregator
    from aggregator.provision import provision
    from fed_unimiss.data.phantom import write_phantoms
    from fed_unimiss.processes import ProcessSet
    from site_client.supernode import free_port

    root = work / preset
    kits = provision(["A", "B"], root / "KITS", server_names=["127.0.0.1"])
    data = root / "data"
    write_phantoms(data, 0, 4, seed=11)
    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    opts = AggregatorOptions(kit=kits.coordinator, rounds=rounds, out=root / "RUN",
                             config=_federation_yaml(root / "fed.yaml", preset, local_steps),
                             fleet_address=fleet, control_address=control, wait_for_sites=2)
    t0 = time.monotonic()
    with ProcessSet(root / "pids") as sites:
        def start_sites() -> None:
            for s in ("A", "B"):
                sites.start(s, [sys.executable, "-m", "fed_unimiss.cli.main", "site", "start",
                                "--kit", str(kits.sites[s]), "--data", str(data),
                                "--superlink", fleet, "--state-dir", str(root / "state" / s)],
                            root / f"site-{s}.log")

        outcome = run_aggregator(opts, on_ready=start_sites)
    total = time.monotonic() - t0
    if not outcome.ok:
        raise RuntimeError(f"{preset}: {outcome.error}")
    per_round = []
    for row in outcome.rounds:
        compute = max(float(m.get("seconds", 0.0)) for m in row["per_site"].values())
        per_round.append({"round": row["round"], "wall": float(row["seconds"]),
                          "compute": compute, "overhead": float(row["seconds"]) - compute,
                          "bytes_in": int(row.get("bytes_in", 0))})
    return {"preset": preset, "rounds": per_round, "total": total, "local_steps": local_steps}


def _markdown(results: list[dict], load: str) -> str:
    lines = [
        SECTION,
        "",
        f"`benchmarks/bench_deploy.py` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPU cores, load average at start {load}): 2 sites with "
        "4 phantom X-rays each, TLS and site authentication on 127.0.0.1, `evaluate: false`. "
        "*site compute* is the slowest site's local training loop as the ClientApp times it; "
        "*coordination* is everything else in the round: Flower's polling (3 s SuperNode "
        "idle loop), one new `flwr-clientapp` process per message (Python + torch import, "
        "model build, cache open), serialization and loopback transfer. Round 1 also builds "
        "each site's cache. A load average well above 2 means other jobs shared the 2 cores, "
        "which inflates process start-up most.",
        "",
        "| preset | local steps | round | wall (s) | site compute (s) | coordination (s) | MB in |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rounds"]:
            lines.append(f"| {res['preset']} | {res['local_steps']} | {r['round']} | "
                         f"{r['wall']:.1f} | {r['compute']:.1f} | {r['overhead']:.1f} | "
                         f"{r['bytes_in'] / 1e6:.1f} |")
    lines.append("")
    for res in results:
        steady = [r["overhead"] for r in res["rounds"][1:]] or [r["overhead"] for r in res["rounds"]]
        lines.append(f"- {res['preset']}: median coordination overhead "
                     f"{statistics.median(steady):.1f} s per round; whole run incl. start-up "
                     f"{res['total']:.0f} s.")
    lines += ["", "Command: `.venv/bin/python benchmarks/bench_deploy.py "
              + " ".join(sys.argv[1:]) + "`", ""]
    return "\n".join(lines)


def write_section(doc: Path, text: str) -> None:
    replace_section(doc, SECTION, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["micro", "tiny"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as work:
        for preset in args.presets:
            print(f"benchmarking {preset} ...", flush=True)
            results.append(bench_preset(preset, args.rounds, args.local_steps, Path(work)))
    text = _markdown(results, load)
    print(text)
    write_section(Path(args.doc), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
