"""DP-SGD cost: one self-distillation step with and without differential privacy.

For each preset (micro, tiny) and step kind (2D X-ray step; 3D CT step with its slices through
the 2D path), a child process times the plain step of :class:`fed_unimiss.ssl.SelfDistillation`
(forward, backward, AdamW) and the DP step of :class:`fed_unimiss.ssl.dp_step.DPStep`
(per-patient gradients with torch.func, Opacus clipping + noise, AdamW) at the same batch and
inputs, and records its peak RSS. Results go (with ``--write``) into the
"## Differential privacy" section of docs/benchmarks.md:

    .venv/bin/python benchmarks/bench_dp.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

SECTION = "## Differential privacy"
REPO = Path(__file__).resolve().parents[1]
# Per preset: 2D crop side, 3D view (depth, side). Tiny uses reduced sizes to fit 2 CPU cores.
SIZES = {"micro": (48, (8, 48)), "tiny": (96, (8, 64))}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(preset: str, kind: str, mode: str, batch: int, steps: int, warmup: int,
            threads: int, out_dim: int | None) -> dict:
    """Time one (preset, kind, mode) in this process."""
    import torch

    from fed_unimiss.privacy import DPSGD, PrivacyConfig
    from fed_unimiss.privacy.dp_sgd import linear_layers
    from fed_unimiss.ssl.batches import Batch
    from fed_unimiss.ssl.config import load_recipe
    from fed_unimiss.ssl.dp_step import DPStep
    from fed_unimiss.ssl.engine import SelfDistillation
    from fed_unimiss.ssl.gradient_step import PlainStep
    from fed_unimiss.ssl.steps import patient_step_loss, per_sample_teacher_logits

    torch.set_num_threads(threads)
    recipe = load_recipe(REPO / "configs/pretrain/micro.yaml")
    from fed_unimiss.models import get_config

    model = get_config(preset, head_weight_norm=False, head_out_dim=out_dim)
    crop, (depth, side) = SIZES[preset]
    recipe = dataclasses.replace(recipe, model=model, ssl=dataclasses.replace(
        recipe.ssl, crop_2d=crop, view_depth=depth, view_size=side, freeze_last_layer=0,
        koleo_weight=0.0))  # KoLeo (micro only) is refused under DP: compare the same loss
    engine = SelfDistillation(recipe, 100,
                              gradient_step=DPStep(PrivacyConfig(enabled=True), 1.0, dp_seed=0))
    shape = (batch, 2, 3, crop, crop) if kind == "2d" else (batch, 2, 1, depth, side, side)
    views = torch.randn(shape)
    engine._set_hyperparameters(20, kind)
    dp = DPSGD(engine.student, engine.optimizer, 1.0, 1.0, float(batch), ghost=linear_layers(engine.student))
    plain, times = PlainStep(), []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if mode == "dp":
            targets = per_sample_teacher_logits(engine.teacher, kind, views)
            dp.step(patient_step_loss(engine.loss_fn, kind), [views, *targets], batch)
        else:
            plain.update(engine.step_context(), 20, kind, Batch([views[:, 0], views[:, 1]], batch, 0))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"preset": preset, "kind": kind, "mode": mode, "batch": batch,
            "out_dim": model.head_out_dim,
            "input": f"{crop}^2" if kind == "2d" else f"{depth}x{side}^2 (+{depth} slices)",
            "step_s": sum(times) / len(times), "best_s": min(times), "peak_rss_mb": _rss_mb()}


def _table(rows: list[dict]) -> str:
    lines = ["| preset | step | input | batch | head out_dim | non-DP s/step | DP s/step | "
             "DP / non-DP | non-DP peak RSS (MB) | DP peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pairs: dict[tuple, dict] = {}
    for r in rows:
        pairs.setdefault((r["preset"], r["kind"], r["out_dim"], r["batch"]), {})[r["mode"]] = r
    for (preset, kind, out_dim, _batch), p in pairs.items():
        if "plain" not in p or "dp" not in p:
            continue
        a, b = p["plain"], p["dp"]
        lines.append(f"| {preset} | {kind.upper()} | {a['input']} | {a['batch']} | {out_dim} | "
                     f"{a['step_s']:.2f} | {b['step_s']:.2f} | {b['step_s'] / a['step_s']:.2f}x | "
                     f"{a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    replace_section(path, SECTION, f"{SECTION}\n\n{body.strip()}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["micro", "tiny"])
    parser.add_argument("--kinds", nargs="+", choices=["2d", "3d"], default=["2d", "3d"])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dim", type=int, default=None,
                        help="head_out_dim override (e.g. 8192: a smaller head for DP runs)")
    parser.add_argument("--write", type=Path, help="markdown file whose section to update")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        preset, kind, mode = args.child.split(":")
        print(json.dumps(run_one(preset, kind, mode, args.batch[0], args.steps, args.warmup,
                                 args.threads, args.out_dim)))
        return 0
    rows = []
    runs = [(p, k, b, m) for p in args.presets for k in args.kinds for b in args.batch
            for m in ("plain", "dp")]
    for preset, kind, batch, mode in runs:
        cmd = [sys.executable, __file__, "--child", f"{preset}:{kind}:{mode}",
               "--batch", str(batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        if args.out_dim:
            cmd += ["--out-dim", str(args.out_dim)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    table = _table(rows)
    print(table)
    if args.write:
        load = os.getloadavg()[0]
        command = " ".join(["OMP_NUM_THREADS=1" if args.threads == 1 else "",
                            ".venv/bin/python benchmarks/bench_dp.py", *(argv or sys.argv[1:])])
        body = (f"Command: `{command.strip()}` "
                f"({args.steps} timed steps after {args.warmup} warm-up, "
                f"{args.threads} threads; 1-min load average at the end {load:.1f} on a "
                f"{os.cpu_count()}-core machine).\n\n"
                f"{table}\n")
        write_section(args.write, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
