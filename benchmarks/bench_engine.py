"""What a site needs to train each preset: peak memory and step time of the whole engine step,
per precision, on this machine's device.

Unlike bench_model.py (the student's forward + backward alone, against the reference code), a
step here is everything ``SelfDistillation.train_steps`` does: the views from a real phantom site
cache, the EMA teacher's forward, the student's forward and backward under the chosen autocast,
gradient clipping, AdamW with its fp32 state, the teacher update and the center. Each
(preset, precision) runs in a fresh subprocess that reports its own peak resident memory (CPU)
or peak allocated device memory (CUDA), so no configuration inflates another's. 2D (X-ray crops)
and 3D (CT sub-volumes) steps alternate; each is timed separately (median).

    .venv/bin/python benchmarks/bench_engine.py --write docs/benchmarks.md
    .venv/bin/python benchmarks/bench_engine.py --presets micro --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Engine step per preset and precision"


def _child(spec: dict) -> dict:
    import torch

    from fed_unimiss.data.cache import SiteIndex
    from fed_unimiss.runtime import Runtime
    from fed_unimiss.ssl.config import load_recipe, with_ssl
    from fed_unimiss.ssl.engine import SelfDistillation
    from fed_unimiss.ssl.site_data import SiteData

    torch.set_num_threads(spec["threads"])
    runtime = Runtime(device=spec["device"], precision=spec["precision"])
    device = runtime.torch_device()
    recipe = load_recipe(REPO / "configs" / "pretrain" / f"{spec['preset']}.yaml")
    recipe = with_ssl(recipe, batch_size_2d=spec["batch"], batch_size_3d=spec["batch"],
                      steps_per_epoch=1, alternate_interval=1, epochs=1000, threads=spec["threads"])
    data = SiteData.from_index(SiteIndex.load(Path(spec["work"]) / spec["preset"]))
    engine = SelfDistillation(recipe, 1000, device=device, precision=runtime.precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {"2d": [], "3d": []}
    for step in range(2 * (spec["warmup"] + spec["steps"])):
        t0 = time.perf_counter()
        stats = engine.train_steps(data, step, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2 * spec["warmup"]:
            times[stats.history[-1]["phase"]].append(time.perf_counter() - t0)
    out = {"s_2d": statistics.median(times["2d"]), "s_3d": statistics.median(times["3d"]),
           "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "device": str(device)}
    if device.type == "cuda":
        out["device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _prepare(work: Path, presets: list[str]) -> None:
    """A phantom site cached with each preset's data settings (the real data layer)."""
    from fed_unimiss.data.cache import build_cache
    from fed_unimiss.data.phantom import write_phantoms
    from fed_unimiss.ssl.config import load_recipe

    images = work / "images"
    if not images.exists():
        write_phantoms(images, n_ct=2, n_xray=4, seed=0)
    for preset in presets:
        recipe = load_recipe(REPO / "configs" / "pretrain" / f"{preset}.yaml")
        build_cache([images], work / preset, recipe.data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["micro", "tiny", "small"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                   choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2, help="samples per step (2D and 3D)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, help="folder for the phantom caches (default: a temp)")
    p.add_argument("--write", type=Path, help="markdown file whose section to update")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return 0
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-engine-"))
    _prepare(work, a.presets)
    rows = []
    for preset in a.presets:
        for precision in a.precisions:
            spec = {"preset": preset, "precision": precision, "device": a.device,
                    "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
                    "threads": a.threads, "work": str(work)}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            row = {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{preset:6s} {precision}: 2D {row['s_2d']:.3f} s/step, 3D {row['s_3d']:.3f} "
                  f"s/step, peak RSS {row['rss_mb']:.0f} MB", flush=True)
    if a.write:
        lines = [
            SECTION,
            "",
            f"Measured with `python benchmarks/bench_engine.py {' '.join(argv or sys.argv[1:])}` "
            f"on {platform.processor() or platform.machine()}, device {rows[0]['device']}, "
            f"{a.threads} thread(s), batch {a.batch} per step (2D crops and 3D sub-volumes at "
            f"each preset's recipe sizes), median of {a.steps} steps of each kind after "
            f"{a.warmup} warm-up. A step is the whole engine step (views, teacher, student "
            "forward/backward, AdamW, EMA, center); peak RSS is the process's, model, optimiser "
            "state and data included.",
            "",
            "| preset | precision | 2D s/step | 3D s/step | peak RSS MB |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['preset']} | {r['precision']} | {r['s_2d']:.3f} | "
                         f"{r['s_3d']:.3f} | {r['rss_mb']:.0f} |")
        replace_section(a.write, SECTION, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
