"""Deployment benchmark: where a round's time and bytes go on loopback.

A real deployment on 127.0.0.1 (provisioned CA and keys, SuperLink with TLS and site
authentication, two ``fed-unimiss site start`` processes on phantom X-ray data) runs a few rounds
of the real ServerApp/ClientApp per model preset and *arm*:

- ``cold-fp32``: no warm worker (``site start --no-worker``: every message imports torch and
  builds the model in Flower's fresh ``flwr-clientapp`` process), fp32 exchange (the baseline);
- ``warm-fp32``: the site's warm worker, fp32 exchange;
- ``warm-compressed``: the warm worker and the shipped exchange (int8 deltas both ways);
- ``warm-secure``: the same with secure aggregation up (``exchange.up: secure``: three more
  message stages per round; needs ``--sites 3`` or more).

From RUN/rounds.jsonl (``seconds``, ``site_seconds``, ``bytes_down``/``bytes_up``, ``phases``),
the sites' ``logs/shim-timing.jsonl`` and the checkpoints, per round:

- wall: the ServerApp's round time (push to last reply, aggregation);
- site compute: the slowest site's local training loop;
- coordination = wall - site compute, split into: the ``flwr-clientapp`` process start until our
  handler runs (Python + Flower import), the site's round work outside training (decode,
  encode, data/model set-up; with the worker this runs in the warm process), the coordinator's
  encode + decode/validate + screen + aggregate, and the rest: Flower's polls (SuperNode 3 s idle
  loop, SuperExec 1 s task poll, 0.5 s reply poll), serialisation and transfer over three hops;
- bytes per site per round (down + up, as sent) against the fp32 arm;
- drift: relative L2 distance of the final global student from the ``warm-fp32`` run's.

Usage::

    .venv/bin/python benchmarks/bench_deploy.py --presets micro tiny --rounds 3
    .venv/bin/python benchmarks/bench_deploy.py --presets micro tiny:20 --sites 3 \
        --arms warm-compressed warm-secure --reference warm-compressed \
        --section "## Deployment: secure aggregation against screening"

Results replace the "## Deployment" section of docs/benchmarks.md (or ``--section``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Deployment"
ARMS = {  # name -> (warm worker, exchange)
    "cold-fp32": (False, {"down": "fp32", "up": "fp32", "teacher": "exchanged"}),
    "warm-fp32": (True, {"down": "fp32", "up": "fp32", "teacher": "exchanged"}),
    "warm-compressed": (True, None),  # None: the shipped configs/federation/micro.yaml exchange
    "warm-secure": (True, {"down": "q8_delta", "up": "secure", "teacher": "exchanged"}),
}
SECURE_STAGES = ("secure_share_keys_s", "secure_masked_input_s", "secure_unmask_s")


def _federation_yaml(path: Path, preset: str, local_steps: int, exchange: dict | None,
                     n_sites: int) -> Path:
    import yaml

    from aggregator.demo import write_federation_yaml

    write_federation_yaml(path, min_sites=n_sites, round_timeout=1800, local_steps=local_steps)
    cfg = yaml.safe_load(path.read_text())
    if preset != "micro":  # same federation and recipe overrides as micro, the preset's recipe
        cfg["recipe"] = cfg["recipe"].replace("pretrain/micro.yaml", f"pretrain/{preset}.yaml")
    if exchange is not None:
        cfg["exchange"] = exchange
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _timings(state: Path) -> dict[int, dict]:
    """Round -> the train message's shim timestamps at one site."""
    out = {}
    path = state / "logs" / "shim-timing.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            t = json.loads(line)
            if t.get("kind") == "train" and t.get("round") is not None:
                out[int(t["round"])] = t
    return out


def bench_arm(preset: str, arm: str, rounds: int, local_steps: int, work: Path,
              n_sites: int = 2) -> dict:
    from aggregator.deploy.runner import AggregatorOptions, run_aggregator
    from aggregator.provision import provision
    from fed_unimiss.checkpoint import load_checkpoint
    from fed_unimiss.data.phantom import write_phantoms
    from flower_layer.processes import ProcessSet
    from site_client.supernode import free_port

    warm, exchange = ARMS[arm]
    root = work / f"{preset}-{arm}"
    names = [chr(ord("A") + i) for i in range(n_sites)]
    kits = provision(names, root / "KITS", server_names=["127.0.0.1"])
    data = root / "data"
    write_phantoms(data, 0, 4, seed=11)
    fleet, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = _federation_yaml(root / "fed.yaml", preset, local_steps, exchange, n_sites)
    opts = AggregatorOptions(kit=kits.coordinator, rounds=rounds, out=root / "RUN",
                             config=config, fleet_address=fleet, control_address=control,
                             wait_for_sites=n_sites)
    states = {s: root / "state" / s for s in names}
    t0 = time.monotonic()
    with ProcessSet(root / "pids") as sites:
        def start_sites() -> None:
            for s in names:
                sites.start(s, [sys.executable, "-m", "fed_unimiss.cli.main", "site", "start",
                                "--kit", str(kits.sites[s]), "--data", str(data),
                                "--superlink", fleet, "--state-dir", str(states[s])]
                            + ([] if warm else ["--no-worker"]), root / f"site-{s}.log")

        outcome = run_aggregator(opts, on_ready=start_sites)
    total = time.monotonic() - t0
    if not outcome.ok:
        raise RuntimeError(f"{preset} {arm}: {outcome.error}")
    timings = {s: _timings(states[s]) for s in states}
    per_round = []
    for row in outcome.rounds:
        n = row["round"]
        compute = max(float(v) for v in row["site_seconds"].values())
        phases = row.get("phases", {})
        ours = sum(phases.get(k, 0.0) for k in ("encode_s", "decode_validate_s", "screen_s",
                                                  "aggregate_s"))
        stages = sum(phases.get(k, 0.0) for k in SECURE_STAGES)
        starts, work_outside, to_site, back = [], [], [], []
        pushed, arrived = phases.get("pushed_at"), phases.get("arrived_at", {})
        for s in states:
            t = timings[s].get(n)
            if t is None:
                continue
            if t.get("process_start"):
                starts.append(t["handler_start"] - t["process_start"])
                if pushed:
                    to_site.append(t["process_start"] - pushed)
            local = float(row["site_seconds"].get(s, 0.0))
            work_outside.append((t["work_end"] - t["work_start"]) - local)
            if str(t.get("node_id")) in arrived:
                back.append(arrived[str(t["node_id"])] - t["end"])
        start_s = max(starts) if starts else float("nan")
        outside = max(work_outside) if work_outside else float("nan")
        wall = float(row["seconds"])
        bytes_site = statistics.mean(row["bytes_down"][s] + row["bytes_up"][s]
                                     for s in row["bytes_up"])
        per_round.append({"round": n, "wall": wall, "compute": compute,
                          "overhead": wall - compute, "process_start": start_s,
                          "site_work": outside, "coordinator": ours,
                          "rest": wall - compute - ours - start_s - outside - stages,
                          "stages": stages,
                          "to_site": statistics.mean(to_site) if to_site else float("nan"),
                          "back": statistics.mean(back) if back else float("nan"),
                          "bytes": bytes_site, "loss": row["loss"],
                          "exchange": row.get("exchange")})
    final, _ = load_checkpoint(root / "RUN" / f"global_round_{rounds:04d}.safetensors")
    student = {k: v for k, v in final.items() if k.startswith("student.")}
    import torch

    torch.save(student, work / f"{preset}-{arm}.pt")
    return {"preset": preset, "arm": arm, "rounds": per_round, "total": total,
            "local_steps": local_steps, "student": str(work / f"{preset}-{arm}.pt"),
            "sites": n_sites}


def _drift(path: str, ref_path: str) -> float:
    import torch

    a, b = torch.load(path), torch.load(ref_path)
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    norm = sum(float(b[k].double().pow(2).sum()) for k in b)
    return math.sqrt(diff / norm)


def _fp32_state_bytes(student_path: str) -> int:
    """fp32 bytes of the saved student (the teacher has the same tensors; the center is tiny)."""
    import torch

    return 4 * sum(t.numel() for t in torch.load(student_path).values())


def _markdown(results: list[dict], load: str, argv: list[str], section: str = SECTION,
              reference: str = "warm-fp32") -> str:
    n_sites = results[0]["sites"] if results else 2
    lines = [
        section,
        "",
        f"`benchmarks/bench_deploy.py` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPU cores shared with other engineers' jobs, load average at start "
        f"{load}): {n_sites} sites with 4 phantom X-rays each, TLS and site authentication on "
        "127.0.0.1, `evaluate: false`, torch threads 1. Arms: *cold* = `site start "
        "--no-worker` (every message imports torch and builds the model in a fresh "
        "`flwr-clientapp`), *warm* = the site's warm worker; *fp32* or *compressed* (bf16 "
        "down, int8 deltas up with error feedback); *secure* = int8 down, secure aggregation "
        "up (2^16 ring, masked). Columns (seconds): *wall* = the round at "
        "the ServerApp; *compute* = the slowest site's training loop; *coord.* = wall - "
        "compute, split into *start* (the `flwr-clientapp` process until our handler runs: "
        "Python + Flower import), *site work* (the site's round outside training: decode, "
        "encode, model and data set-up), *ours@coord.* (encode, decode + validate, screen, "
        "aggregate at the coordinator), *secure stages* (share keys, masked input, unmask: "
        "each one more message to every site and back, with the site's masking and the "
        "aggregator's unmasking) and *Flower* (the rest: its polls, serialisation and "
        "three hops of transfer; *to site* = from the ServerApp's push until Flower started "
        "the site's `flwr-clientapp` process: the SuperNode's fixed 3 s idle poll, the "
        "SuperExec's task poll and the message's way down; *reply back* = from our handler's "
        "return until the ServerApp pulled the reply: the process's push, the SuperNode's "
        "0.5 s reply poll, the way up). *MB/site* = down + up per site per round as sent; "
        "*drift* = "
        f"relative L2 of the final global student from the {reference} run's. Round 1 also builds "
        "each site's cache.",
        "",
        "| preset | arm | round | wall | compute | coord. | start | site work | ours@coord. "
        "| secure stages | Flower | of which: to site | reply back | MB/site | x fp32 | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp32_bytes = {r["preset"]: statistics.mean(x["bytes"] for x in r["rounds"])
                  for r in results if r["arm"] == "warm-fp32"}
    fp32_bytes.update({r["preset"]: 4 * _fp32_state_bytes(r["student"])  # student + teacher,
                       for r in results if r["preset"] not in fp32_bytes})  # down and up
    for res in results:
        for r in res["rounds"]:
            ratio = r["bytes"] / fp32_bytes[res["preset"]] if res["preset"] in fp32_bytes \
                else float("nan")
            lines.append(
                f"| {res['preset']} ({res['local_steps']} steps) | {res['arm']} | {r['round']} | {r['wall']:.1f} | "
                f"{r['compute']:.1f} | {r['overhead']:.1f} | {r['process_start']:.1f} | "
                f"{r['site_work']:.1f} | {r['coordinator']:.1f} | {r.get('stages', 0.0):.1f} | "
                f"{r['rest']:.1f} | "
                f"{r['to_site']:.1f} | {r['back']:.1f} | "
                f"{r['bytes'] / 1e6:.1f} | {ratio:.2f} | {r['loss']:.3f} |")
    lines.append("")
    refs = {r["preset"]: r for r in results if r["arm"] == reference}
    for res in results:
        steady = [r for r in res["rounds"][1:]] or res["rounds"]
        over = statistics.median(r["overhead"] for r in steady)
        share = statistics.median(r["overhead"] / r["wall"] for r in steady)
        drift = ""
        if res["preset"] in refs and res is not refs[res["preset"]]:
            drift = f"; drift from {reference} {_drift(res['student'], refs[res['preset']]['student']):.2e}"
        lines.append(f"- {res['preset']} {res['arm']}: median coordination {over:.1f} s per "
                     f"round after round 1 ({100 * share:.0f} % of the round){drift}; whole run "
                     f"incl. start-up {res['total']:.0f} s.")
    lines += ["", "Command: `.venv/bin/python benchmarks/bench_deploy.py " + shlex.join(argv) + "`",
              ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["micro", "tiny:20"],
                    help="PRESET or PRESET:LOCAL_STEPS (default steps: --local-steps)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS),
                    help="ARM or PRESET=ARM (e.g. tiny=warm-fp32) among " + ", ".join(ARMS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--sites", type=int, default=2, help="sites (secure needs at least 3)")
    ap.add_argument("--section", default=SECTION, help="the docs section to replace")
    ap.add_argument("--reference", default="warm-fp32", choices=list(ARMS),
                    help="the arm drift is measured from")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as work:
        for spec in args.presets:
            preset, _, steps = spec.partition(":")
            arms = [a.partition("=")[2] or a for a in args.arms
                    if "=" not in a or a.partition("=")[0] == preset]
            for arm in arms:
                if arm not in ARMS:
                    ap.error(f"--arms: unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
                print(f"benchmarking {preset} {arm} ...", flush=True)
                results.append(bench_arm(preset, arm, args.rounds,
                                         int(steps) if steps else args.local_steps, Path(work),
                                         args.sites))
                print(json.dumps(results[-1]["rounds"]), flush=True)
        text = _markdown(results, load, sys.argv[1:], args.section, args.reference)
    print(text)
    doc = Path(args.doc)
    replace_section(doc, args.section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
