"""CPU time of each paper benchmark's one command, measured on synthetic data in its layout.

For every configs/finetune/<benchmark>.yaml this runs ``fed-unimiss finetune`` exactly as
docs/reproduce.md gives it (paper-sized ``small`` MiT, the config's patch / input size and batch),
only cut to ``--epochs 1 --steps-per-epoch N``, on small synthetic data written in the
benchmark's own layout (tests/finetune/ft_layouts.py). From the run's history it takes the
seconds per training step (the first step, which warms up allocators, is a separate run) and per
validation item, and extrapolates the full protocol on this CPU. It also counts the FLOPs of one
training step (torch's FlopCounterMode, forward + backward), the basis of the GPU estimate.

    OMP_NUM_THREADS=1 python benchmarks/bench_reproduce.py --work /tmp/bench-repro --doc

Results: ``WORK/results.json`` and, with ``--doc``, the section "Measured CPU times" of
docs/reproduce.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests" / "finetune"))
from markdown_section import replace_section  # noqa: E402

HEADING = "## Measured CPU times"

# The full protocol's size: training steps, validations, and validation items of each pass,
# with the resampled volume a validation item typically has (an assumption, for window counts).
PROTOCOL = {
    # 86,524 train_val images / batch 32 per epoch, 100 epochs; test list 25,596, every 10 epochs
    "chestx-ray14": dict(steps=100 * math.ceil(86524 / 32), validations=10, val_items=25596),
    "mm-whs": dict(steps=100 * 250, validations=10, val_items=4, volume=(40, 200, 200)),
    "msd": dict(steps=100 * 250, validations=10, val_items=8, volume=(100, 400, 400)),
    "msd-spleen": dict(steps=100 * 250, validations=10, val_items=8, volume=(100, 400, 400)),
    "nlst-nodule": dict(steps=100 * 64, validations=20, val_items=200),
    "bcv": dict(steps=100 * 250, validations=10, val_items=12, volume=(130, 400, 400)),
}


def windows(shape, roi, overlap: float) -> int:
    """Sliding windows MONAI's inferer places over ``shape`` (its scan-interval rule)."""
    n = 1
    for size, r in zip(shape, roi, strict=True):
        step = max(int(r * (1 - overlap)), 1)
        n *= 1 if size <= r else math.ceil((size - r) / step) + 1
    return n


def write_data(name: str, root: Path) -> Path:
    from ft_layouts import write_bcv, write_decathlon, write_mmwhs, write_nih, write_nodules

    shape = (48, 160, 160)  # the validation volume: large enough for several windows
    if name == "chestx-ray14":  # NIH PNGs are 1024 x 1024: decoding them is part of a step
        return write_nih(root, n_patients=12, per_patient=4, size=1024, test_patients=2)
    if name == "mm-whs":
        return write_mmwhs(root, n=5, shape=shape)
    if name in ("msd", "msd-spleen"):
        return write_decathlon(root, n=5, shape=shape)
    if name == "nlst-nodule":
        return write_nodules(root, n_patients=10, per_patient=2, shape=(20, 64, 64))
    return write_bcv(root, n=5, shape=shape)


def run_command(config: str, data: Path, out: Path, steps: int) -> dict:
    from fed_unimiss.cli.main import main as cli_main

    argv = ["finetune", "--config", f"configs/finetune/{config}.yaml", "--init", "scratch",
            "--train", str(data), "--val", str(data), "--out", str(out), "--epochs", "1",
            "--steps-per-epoch", str(steps), "--threads", str(torch_threads())]
    print("$ fed-unimiss " + " ".join(argv), flush=True)
    start = time.perf_counter()
    if cli_main(argv) != 0:
        raise SystemExit(f"{config}: the command failed")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - start
    return metrics


def torch_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "1"))


def step_flops(config: str) -> float:
    """FLOPs of one training step (forward + backward) at the config's input size and batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fed_unimiss.finetune import load_finetune_config
    from fed_unimiss.finetune.trainer import build_task_model

    cfg = load_finetune_config(REPO / "configs" / "finetune" / f"{config}.yaml")
    k = cfg.num_classes or (len(cfg.class_names) if cfg.class_names else 3)
    model, _ = build_task_model(cfg, None, k)
    chans = 3 if cfg.spatial_dims == 2 else 1
    x = torch.randn(cfg.batch_size, chans, *cfg.input_size)
    with FlopCounterMode(display=False) as counter:
        out = model.train()(x)
        loss = sum(o.float().mean() for o in out) if isinstance(out, list) else out.mean()
        loss.backward()
    return float(counter.get_total_flops())


def measure(config: str, work: Path, steps: int) -> dict:
    from fed_unimiss.finetune import load_finetune_config

    cfg = load_finetune_config(REPO / "configs" / "finetune" / f"{config}.yaml")
    data = write_data(config, work / "data" / config)
    run_command(config, data, work / "warm" / config, 1)  # allocator / first-call warm-up
    m = run_command(config, data, work / "runs" / config, steps)
    row = m["history"][-1]
    p = PROTOCOL[config]
    per_step = row["train_seconds"] / steps
    per_item = row["val_seconds"] / m["data"]["val_items"]
    result = {"config": config, "steps_measured": steps, "batch_size": cfg.batch_size,
              "input_size": list(cfg.input_size), "seconds_per_step": per_step,
              "val_items_measured": m["data"]["val_items"], "seconds_per_val_item": per_item,
              "flops_per_step": step_flops(config)}
    if "volume" in p:  # seconds per window of the synthetic volume -> the real volume's windows
        grid = [int(s) for s in next(iter(_val_shapes(config, data, cfg)))]
        synthetic = windows(grid, cfg.input_size, cfg.sw_overlap)
        real = windows(p["volume"], cfg.input_size, cfg.sw_overlap)
        per_item = per_item / synthetic * real
        result.update(windows_measured=synthetic, windows_real=real, real_volume=p["volume"])
    val_hours = per_item * p["val_items"] * p["validations"] / 3600
    train_hours = per_step * p["steps"] / 3600
    result.update(protocol_steps=p["steps"], protocol_val_items=p["val_items"],
                  protocol_validations=p["validations"], cpu_train_hours=train_hours,
                  cpu_val_hours=val_hours, cpu_total_hours=train_hours + val_hours)
    return result


def _val_shapes(config, data, cfg):
    from fed_unimiss.finetune.tasks import load_seg_data

    return [c.image.shape for c in load_seg_data(data, cfg, None, side="val").cases]


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        HEADING, "",
        f"`{results['command']}` ({env['date']}, {env['cpu']}, torch {env['torch']}, "
        f"{env['threads']} thread(s) on a 2-core machine shared with other jobs: expect "
        "noise of tens of percent, e.g. msd and msd-spleen below run the same network on "
        "the same volume size). Each benchmark's one command, cut to one short epoch, on "
        "synthetic data in its layout with the paper-sized `small` MiT from scratch (an "
        "export has the same network); the first step is a separate warm-up run.", "",
        "- *s / val item* is measured on the synthetic validation item (for volumes: a "
        "48 x 160 x 160 grid, its sliding-window count given); *per real item* scales it to "
        "the window count of the volume size listed (an assumption for the data set).",
        "- *full protocol, CPU* = measured s / step x the protocol's steps + its validations "
        "(every `val_every` epochs over the validation items): an extrapolation on one thread.",
        "- *GPU* = FLOPs of one training step (torch FlopCounterMode, forward + backward) x "
        "steps / 10 TFLOP/s sustained fp32: a compute-bound lower bound for the training "
        "alone, not a measurement (no GPU here); data loading and validation come on top.", "",
        "| benchmark | input x batch | s / step (CPU) | GFLOP / step | s / val item (CPU) "
        "| per real item (CPU) | full protocol, CPU | training, one GPU (lower bound) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["benchmarks"]:
        size = "x".join(map(str, r["input_size"]))
        if "windows_real" in r:
            measured = f"{r['seconds_per_val_item']:.1f} ({r['windows_measured']} windows)"
            real = (r["seconds_per_val_item"] / r["windows_measured"] * r["windows_real"])
            per_real = (f"{real / 60:.0f} min ({r['windows_real']} windows, "
                        f"{'x'.join(map(str, r['real_volume']))})")
        else:
            measured, per_real = f"{r['seconds_per_val_item']:.2f}", "same"
        gpu_train = r["flops_per_step"] * r["protocol_steps"] / 10e12 / 3600
        gpu = (f"{gpu_train:.1f} h" if gpu_train >= 1 else f"{gpu_train * 60:.0f} min"
               if gpu_train * 60 >= 1 else "< 1 min")
        lines.append(
            f"| {r['config']} | {size} x {r['batch_size']} | {r['seconds_per_step']:.1f} | "
            f"{r['flops_per_step'] / 1e9:.0f} | {measured} | {per_real} | "
            f"{r['cpu_total_hours']:.0f} h ({r['protocol_steps']} steps, "
            f"{r['protocol_validations']} x {r['protocol_val_items']} val items) | "
            f"{gpu} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per benchmark")
    ap.add_argument("--only", nargs="*", default=list(PROTOCOL), choices=list(PROTOCOL))
    ap.add_argument("--doc", action="store_true", help="write the section of docs/reproduce.md")
    ap.add_argument("--doc-only", action="store_true",
                    help="rewrite the section from WORK/results.json without measuring")
    a = ap.parse_args(argv)
    os.chdir(REPO)
    if a.doc_only:
        replace_section(REPO / "docs" / "reproduce.md", HEADING,
                        markdown(json.loads((a.work / "results.json").read_text())))
        return 0
    import torch

    torch.set_num_threads(torch_threads())
    results = {"command": "OMP_NUM_THREADS=%d python benchmarks/bench_reproduce.py --work W "
                          "--steps %d --doc" % (torch_threads(), a.steps),
               "environment": {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor()
                               or platform.machine(), "torch": torch.__version__,
                               "threads": torch_threads()},
               "benchmarks": []}
    for name in a.only:
        r = measure(name, a.work, a.steps)
        print(json.dumps(r), flush=True)
        results["benchmarks"].append(r)
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "results.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    print(text)
    if a.doc:
        replace_section(REPO / "docs" / "reproduce.md", HEADING, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
