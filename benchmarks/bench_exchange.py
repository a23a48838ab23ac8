"""Compressed exchange candidates, each alone and combined: bytes, drift, loss.

Runs the real ServerApp and ClientApps in process (``simulate``) on two phantom sites (CT +
X-rays each), the micro recipe, for every exchange in :data:`VARIANTS`, and reads back from
RUN/rounds.jsonl and the checkpoints:

- bytes per site per round, down + up as sent, against fp32 full state both ways;
- drift: relative L2 distance of the final global student from the fp32 run's (same seed),
  and as a fraction of how far the fp32 run's student moved from its initial value;
- the training loss per round, next to the fp32 runs of three seeds (run-to-run noise:
  different seeds draw different initial weights and views).

    .venv/bin/python benchmarks/bench_exchange.py --rounds 6 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Exchange codecs"

VARIANTS = {  # name -> exchange section
    "fp32": {"down": "fp32", "up": "fp32", "teacher": "exchanged"},
    "bf16 down": {"down": "bf16", "up": "fp32", "teacher": "exchanged"},
    "bf16 both (full tensors)": {"down": "bf16", "up": "bf16", "teacher": "exchanged"},
    "fp16 both (full tensors)": {"down": "fp16", "up": "fp16", "teacher": "exchanged"},
    "q8 delta up": {"down": "fp32", "up": "q8_delta", "teacher": "exchanged"},
    "local teacher": {"down": "fp32", "up": "fp32", "teacher": "local"},
    "bf16 down + q8 up": {"down": "bf16", "up": "q8_delta", "teacher": "exchanged"},
    "fp16 down + q8 up": {"down": "fp16", "up": "q8_delta", "teacher": "exchanged"},
    "bf16 down + q8 up + local teacher": {"down": "bf16", "up": "q8_delta", "teacher": "local"},
    "q8 down": {"down": "q8_delta", "up": "fp32", "teacher": "exchanged"},
    "q8 down + q8 up": {"down": "q8_delta", "up": "q8_delta", "teacher": "exchanged"},
    "q8 down + q8 up + local teacher": {"down": "q8_delta", "up": "q8_delta", "teacher": "local"},
}


def _run(work: Path, name: str, exchange: dict, seed: int, rounds: int, local_steps: int,
         sites: list[tuple[str, Path]]) -> dict:
    import torch

    from aggregator.simulate_cli import simulate
    from fed_unimiss.checkpoint import load_checkpoint

    tag = f"{name.replace(' ', '_').replace('(', '').replace(')', '').replace('+', '')}-s{seed}"
    cfg = work / f"{tag}.yaml"
    cfg.write_text(json.dumps({
        "recipe": str(REPO / "configs" / "pretrain" / "micro.yaml"),
        "recipe_overrides": {"ssl": {"steps_per_epoch": 2, "batch_size_2d": 4,
                                     "batch_size_3d": 1, "threads": 1, "seed": seed}},
        "local_steps": local_steps, "min_sites": 2, "round_timeout": 900, "evaluate": False,
        "poll_interval": 0.01, "exchange": exchange}))
    out = work / tag
    t0 = time.perf_counter()
    simulate(cfg, sites, rounds=rounds, out=out)
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    final, _ = load_checkpoint(out / f"global_round_{rounds:04d}.safetensors")
    student = {k: v for k, v in final.items() if k.startswith("student.")}
    torch.save(student, work / f"{tag}.pt")
    per_round = [sum(r["bytes_down"].values()) / len(r["bytes_down"])
                 + sum(r["bytes_up"].values()) / len(r["bytes_up"]) for r in rows]
    return {"name": name, "seed": seed, "loss": [r["loss"] for r in rows],
            "bytes": sum(per_round) / len(per_round), "student": str(work / f"{tag}.pt"),
            "seconds": seconds, "rejected": sum(len(r["rejected"]) for r in rows)}


def _distance(a_path: str, b_path: str, init: dict | None = None) -> tuple[float, float]:
    import torch

    a, b = torch.load(a_path), torch.load(b_path)
    diff = math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))
    norm = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
    moved = math.sqrt(sum(float((b[k].double() - init[k].double()).pow(2).sum()) for k in b)) \
        if init else float("nan")
    return diff / norm, diff / moved if moved else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--write", type=Path)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from aggregator.rounds import initial_state
    from fed_unimiss.data.phantom import write_phantoms

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-exchange-") as tmp:
        work = Path(tmp)
        write_phantoms(work / "data-A", n_ct=1, n_xray=2, seed=1)
        write_phantoms(work / "data-B", n_ct=1, n_xray=2, seed=2)
        sites = [("A", work / "data-A"), ("B", work / "data-B")]
        results = []
        for seed in (0, 1, 2):  # run-to-run noise of the uncompressed exchange
            results.append(_run(work, "fp32", VARIANTS["fp32"], seed, args.rounds,
                                args.local_steps, sites))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "student"}), flush=True)
        for name in args.variants:
            if name == "fp32":
                continue
            results.append(_run(work, name, VARIANTS[name], 0, args.rounds, args.local_steps,
                                 sites))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "student"}), flush=True)
        ref = results[0]
        from fed_unimiss.federation import load_federation, resolve_recipe

        cfg_path = work / "fp32-s0.yaml"
        recipe = resolve_recipe(load_federation(cfg_path), cfg_path)
        init = {k: v for k, v in initial_state(recipe, args.rounds * args.local_steps).items()
                if k.startswith("student.")}
        fp32_bytes = ref["bytes"]  # the fp32 run's own down + up, as sent
        lines = [f"`.venv/bin/python benchmarks/bench_exchange.py {' '.join(argv or sys.argv[1:])}` "
                 f"on {time.strftime('%Y-%m-%d')}, 2 shared CPU cores (load average {load:.1f} "
                 "at start), torch threads 1. In process (`simulate`), micro recipe, 2 phantom "
                 f"sites (1 CT + 2 X-rays each), {args.rounds} rounds x {args.local_steps} local "
                 "steps, `evaluate: false`. *bytes* = down + up per site per round as sent, "
                 "against fp32 full state both ways "
                 f"({fp32_bytes / 1e6:.1f} MB). *drift* = relative L2 of the final "
                 "global student from the fp32 seed-0 run; *of movement* = the same distance "
                 "over how far that run's student moved from its initial weights. Loss = the "
                 "sites' mean training loss per round.", "",
                 "| exchange | seed | bytes / fp32 | drift | of movement | loss per round | rejected |",
                 "|---|---|---|---|---|---|---|"]
        for r in results:
            drift, moved = _distance(r["student"], ref["student"], init)
            shown = "—" if r is ref else f"{drift:.2e}"
            moved_s = "—" if r is ref else f"{moved:.3f}"
            if r["name"] == "fp32" and r is not ref:
                shown = f"{drift:.2e} (other init)"
            lines.append(f"| {r['name']} | {r['seed']} | {r['bytes'] / fp32_bytes:.3f} "
                         f"| {shown} | {moved_s} | "
                         + " ".join(f"{x:.3f}" for x in r["loss"]) + f" | {r['rejected']} |")
        body = "\n".join(lines)
    print(body)
    if args.write:
        replace_section(args.write, SECTION, f"{SECTION}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
