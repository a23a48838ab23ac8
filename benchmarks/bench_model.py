"""Forward+backward throughput and peak memory of UniMiSSNet on CPU (issue 3).

For each preset and input (2D 224^2, 3D 16x96x96 by default) a fresh subprocess builds the model
(backbone + full DINO head), runs ``--warmup`` then ``--steps`` forward+backward passes on a
random batch and reports samples/s and the peak resident memory of that process (so one
configuration's allocations never inflate another's). Results go to stdout as a markdown table
and, with ``--write``, into the "## Model forward+backward (issue 3)" section of
docs/benchmarks.md (other sections are left alone).

    .venv/bin/python benchmarks/bench_model.py --write docs/benchmarks.md
    .venv/bin/python benchmarks/bench_model.py --presets micro --steps 2   # quick look
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

SECTION = "## Model forward+backward (issue 3)"
INPUTS = {"2d": (3, 224, 224), "3d": (1, 16, 96, 96)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(preset: str, kind: str, batch: int, steps: int, warmup: int, threads: int) -> dict:
    """One configuration, in this process (called in a child by :func:`main`)."""
    import torch

    from fed_unimiss.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(preset)
    x = torch.randn(batch, *INPUTS[kind])
    rss_model = _rss_mb()
    times = []
    for i in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    return {
        "preset": preset,
        "input": f"{kind.upper()} {'x'.join(map(str, INPUTS[kind][1:]))}",
        "batch": batch,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": mean,
        "best_s": min(times),
        "samples_per_s": batch / mean,
        "rss_model_mb": rss_model,
        "peak_rss_mb": _rss_mb(),
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| preset | input | batch | params (M) | s/step (mean) | s/step (best) | samples/s | "
        "RSS after build (MB) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['batch']} | {r['params_m']:.2f} | "
            f"{r['step_s']:.2f} | {r['best_s']:.2f} | {r['samples_per_s']:.2f} | "
            f"{r['rss_model_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    replace_section(path, SECTION, f"{SECTION}\n\n{body.strip()}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--inputs", nargs="+", choices=sorted(INPUTS), default=["2d", "3d"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads; default = number of cores",
    )
    parser.add_argument("--write", type=Path, help="markdown file whose section to update")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one configuration, result as JSON on stdout
        preset, kind = args.child.split(":")
        result = run_one(preset, kind, args.batch, args.steps, args.warmup, args.threads)
        print(json.dumps(result))
        return 0

    rows = []
    for preset in args.presets:
        for kind in args.inputs:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                f"{preset}:{kind}",
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    import torch

    load = os.getloadavg()[0]
    body = "\n".join(
        [
            f"Command: `.venv/bin/python benchmarks/bench_model.py --presets {' '.join(args.presets)} "
            f"--batch {args.batch} --steps {args.steps} --warmup {args.warmup} "
            f"--threads {args.threads}`",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(torch threads {args.threads}), torch {torch.__version__}, fp32, CPU only; "
            f"1-min load average at the end {load:.1f} (the cores are shared, so treat the "
            "numbers as indicative). Each row: a fresh process, UniMiSSNet = MiT + full DINO head, "
            "loss = mean of squared logits, forward+backward, no optimiser step; peak RSS is the "
            "whole process (Python + torch + model + activations).",
            "",
            _table(rows),
        ]
    )
    print("\n" + body)
    if args.write:
        write_section(args.write, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
