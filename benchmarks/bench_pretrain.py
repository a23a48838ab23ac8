"""Pretraining step throughput and peak memory of the SelfDistillation engine.

One fresh process per (preset, phase) so each peak RSS is its own. A step is the full recipe
step: views from the (seed, step) generator, teacher and student forwards (CT steps: volumes plus
every slice through the 2D path, four loss terms), backward, clipping, AdamW, EMA update. Data is
in-memory random tensors of the cached shapes (X-ray 1x512^2, CT tile 1x24xHxW), so the numbers
measure the engine, not disk I/O.

    .venv/bin/python benchmarks/bench_pretrain.py                      # print the table
    .venv/bin/python benchmarks/bench_pretrain.py --write docs/benchmarks.md

``--write`` replaces only the "## Pretraining steps" section of the markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

SECTION = "## Pretraining steps"
REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(preset: str, phase: str, batch: int, steps: int, warmup: int, threads: int) -> dict:
    """Time ``steps`` pretraining steps of one phase after ``warmup`` untimed ones."""
    import torch

    from fed_unimiss.ssl.config import load_recipe, with_ssl
    from fed_unimiss.ssl.engine import SelfDistillation
    from fed_unimiss.ssl.site_data import SiteData

    torch.set_num_threads(threads)
    recipe = load_recipe(REPO / "configs" / "pretrain" / f"{preset}.yaml")
    recipe = with_ssl(recipe, batch_size_2d=batch, batch_size_3d=batch, steps_per_epoch=1000,
                      freeze_last_layer=0)
    g = torch.Generator().manual_seed(0)
    xray_side = recipe.data.xray_size
    side = max(2 * recipe.ssl.view_size, 160)
    if phase == "2d":
        data = SiteData(xray=[torch.rand(1, xray_side, xray_side, generator=g)
                              for _ in range(batch)])
    else:
        depth = recipe.data.ct_tile_depth
        data = SiteData(ct=[torch.randn(1, depth, side, side, generator=g) * 0.3
                            for _ in range(batch)])
    engine = SelfDistillation(recipe, total_steps=1000)
    rss_built = _rss_mb()
    engine.train_steps(data, 0, warmup)
    times = []
    for s in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        engine.train_steps(data, s, 1)
        times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    views = (f"{recipe.ssl.crop_2d}^2" if phase == "2d" else
             f"{recipe.ssl.view_depth}x{recipe.ssl.view_size}^2 (+{recipe.ssl.view_depth} slices)")
    return {"preset": preset, "phase": phase, "batch": batch, "views": views,
            "s_per_step": mean, "best": min(times), "steps_per_s": 1 / mean,
            "samples_per_s": batch / mean, "rss_built": rss_built, "peak_rss": _rss_mb()}


def _child(args: argparse.Namespace, preset: str, phase: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{preset}:{phase}", "--batch", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
           str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    load = os.getloadavg()[0]
    lines = [
        SECTION, "",
        f"Command: `.venv/bin/python benchmarks/bench_pretrain.py --steps {args.steps} "
        f"--warmup {args.warmup} --threads {args.threads} --write docs/benchmarks.md`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (1-min load average at the end "
        f"{load:.1f}; above ~1 other jobs shared the cores), torch threads "
        f"{args.threads}, fp32, CPU only. A step = the full recipe step (views, teacher + student "
        f"forwards, CT slices through the 2D path and four loss terms, backward, clipping, AdamW, "
        f"EMA); each row a fresh process, recipes from configs/pretrain/, in-memory data.", "",
        "| preset | phase | batch | views | s/step (mean) | s/step (best) | steps/s | "
        "samples/s | RSS after build (MB) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['phase']} | {r['batch']} | {r['views']} | "
                     f"{r['s_per_step']:.2f} | {r['best']:.2f} | {r['steps_per_s']:.3f} | "
                     f"{r['samples_per_s']:.2f} | {r['rss_built']:.0f} | {r['peak_rss']:.0f} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    replace_section(path, SECTION, section)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["micro", "tiny"])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--tiny-batch", type=int, default=1, help="batch of non-micro presets")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", type=Path, default=None, help="markdown file to update")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        preset, phase = args.child.split(":")
        print(json.dumps(run_one(preset, phase, args.batch, args.steps, args.warmup,
                                 args.threads)))
        return 0
    rows = []
    for preset in args.presets:
        batch = args.micro_batch if preset == "micro" else args.tiny_batch
        for phase in ("2d", "3d"):
            rows.append(_child(args, preset, phase, batch))
            print(json.dumps(rows[-1]), flush=True)
    section = _table(rows, args)
    print(section)
    if args.write:
        write_section(args.write, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
