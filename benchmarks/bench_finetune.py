"""Fine-tuning against the field's standard: our seg3d pipeline vs a plain MONAI loop.

Arms (every one gets the same cases, steps, batch, lr, warm-up, patch and spacing):

- ``plain``: ``benchmarks/plain_monai_seg.py``, a MONAI U-Net in a plain MONAI loop
  (``RandCropByPosNegLabeld``, ``DiceCELoss``, ``sliding_window_inference``) that shares no
  code with ``finetune``: the peer a fault of our pipeline cannot reach;
- ``ours``: the MiT encoder + decoder + our segmentation head (``--model`` preset), from
  scratch, through ``fed_unimiss.finetune.finetune`` with its defaults;
- ``unet``: the same MONAI U-Net trained *through* ``finetune``: level with ``plain`` when the
  pipeline is sound, below it when the pipeline is at fault;
- ``init:NAME=DIR``: ours from an export of ``fed-unimiss export`` (a pretrained arm).

    python benchmarks/bench_finetune.py --dataset abdomen --abdomen-source DIR --work /tmp/bft
    python benchmarks/bench_finetune.py --dataset phantom-lateral --seeds 0 1 2 --work /tmp/bft

Datasets (:mod:`finetune_data`): ``abdomen`` = a real abdominal CT with lateral labels
(spleen, right and left kidney, liver, stomach, aorta; TotalSegmentator's public example files,
given with ``--abdomen-source``), ``brain`` = real MR anatomy from Debian's mricron-data,
``phantom`` / ``phantom-lateral`` = procedural CT (the latter with the kidneys labelled by side).
Results: ``WORK/DATASET/results.json`` and, with ``--doc``, the section "Fine-tuning against a
plain MONAI loop" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_data import (  # noqa: E402
    ABDOMEN_NAMES,
    LOBE_NAMES,
    write_abdomen_set,
    write_brain_set,
    write_phantom_set,
)
from markdown_section import replace_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# One fine-tuning budget per dataset, the same for every arm.
SETTINGS = {
    "phantom": dict(num_classes=6, patch_3d=(8, 48, 48), ct_spacing=(3.0, 3.5, 3.5),
                    hu_scale=1024.0, class_names=["lung", "liver", "kidney", "bone", "lesion"]),
    "phantom-lateral": dict(num_classes=7, patch_3d=(8, 48, 48), ct_spacing=(3.0, 3.5, 3.5),
                            hu_scale=1024.0, class_names=["lung", "liver", "kidney_right",
                                                          "bone", "lesion", "kidney_left"]),
    "abdomen": dict(num_classes=7, patch_3d=(8, 48, 48), ct_spacing=(2.0, 3.0, 3.0),
                    hu_scale=1024.0, class_names=ABDOMEN_NAMES),
    # T1 MR intensities 0..254: scaled to 0..2, the range of soft tissue in HU / 1024.
    "brain": dict(num_classes=8, patch_3d=(16, 48, 48), ct_spacing=(2.0, 2.0, 2.0),
                  hu_scale=128.0, class_names=LOBE_NAMES),
}


def unet(num_classes: int):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=num_classes,
                channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)


def run_arm(arm: str, init: Path | None, data: Path, out: Path, a, seed: int,
            fraction: float) -> dict:
    import torch

    from fed_unimiss.finetune import FinetuneConfig, finetune

    s = SETTINGS[a.dataset]
    if arm == "plain":
        return run_plain(data, out, a, seed, fraction)
    # --option overrides any of these, the benchmark's own settings included.
    settings = dict(task="seg3d", model=a.model, num_classes=s["num_classes"], epochs=1,
                    steps_per_epoch=a.steps, batch_size=a.batch, lr=a.lr,
                    warmup_steps=a.warmup, patch_3d=s["patch_3d"],
                    ct_spacing=s["ct_spacing"], hu_scale=s["hu_scale"],
                    class_names=("background", *s["class_names"]),
                    foreground_prob=0.5, sw_overlap=0.25, seed=seed,
                    label_fraction=fraction, threads=a.threads)
    cfg = FinetuneConfig(**{**settings, **a.options})
    model = None
    if arm == "unet":
        torch.manual_seed(seed)
        model = unet(s["num_classes"])
    start = time.perf_counter()
    m = finetune(cfg, init, data / "train", data / "val", out, model=model)
    return {"arm": arm, "seed": seed, "fraction": fraction, "dice_mean": m["dice_mean"],
            "dice_per_class": m["dice_per_class"], "seconds": time.perf_counter() - start}


def run_plain(data: Path, out: Path, a, seed: int, fraction: float) -> dict:
    """The plain MONAI loop in its own process (it imports nothing of ours)."""
    if fraction != 1.0:
        raise SystemExit("the plain arm trains on all labelled volumes (--fractions 1.0)")
    s = SETTINGS[a.dataset]
    result = out / "plain.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "plain_monai_seg.py"),
                    "--train", str(data / "train"), "--val", str(data / "val"),
                    "--out", str(result), "--num-classes", str(s["num_classes"]),
                    "--spacing", *map(str, s["ct_spacing"]), "--patch", *map(str, s["patch_3d"]),
                    "--steps", str(a.steps), "--batch", str(a.batch), "--lr", str(a.lr),
                    "--warmup", str(a.warmup), "--hu-scale", str(s["hu_scale"]),
                    "--seed", str(seed), "--threads", str(a.threads)], check=True)
    r = json.loads(result.read_text())
    return {"arm": "plain", "seed": seed, "fraction": fraction, "dice_mean": r["dice_mean"],
            "dice_per_class": r["dice_per_class"], "seconds": r["seconds"]}


def summarise(rows: list[dict]) -> dict:
    """Mean and 95 % t-interval half-width of dice_mean per (arm, fraction)."""
    from scipy import stats

    out: dict = {}
    for key in sorted({(r["arm"], r["fraction"]) for r in rows}):
        vals = np.array([r["dice_mean"] for r in rows if (r["arm"], r["fraction"]) == key])
        half = float(stats.t.ppf(0.975, len(vals) - 1) * vals.std(ddof=1) / np.sqrt(len(vals))) \
            if len(vals) > 1 else float("nan")
        out[f"{key[0]}@{key[1]}"] = {"mean": float(vals.mean()), "ci95": half, "n": len(vals)}
    return out


def markdown(results: dict) -> str:
    a, rows = results["settings"], results["rows"]
    names = SETTINGS[a["dataset"]]["class_names"]
    lines = [f"### {a['dataset']}: {results['summary_line']}", "",
             f"Measured with `{results['command']}` ({len(rows)} runs, "
             f"{sum(r['seconds'] for r in rows) / 60:.0f} min of run time; runs finished "
             f"earlier in the work folder are read back; load average {results['load']:.1f}).",
             "",
             "| arm | labels | Dice mean (95 % CI, n) | " + " | ".join(names) + " | s/run |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for key, s in results["summary"].items():
        arm, frac = key.split("@")
        sel = [r for r in rows if r["arm"] == arm and str(r["fraction"]) == frac]
        per = np.nanmean([[np.nan if d is None else d for d in r["dice_per_class"][1:]]
                          for r in sel], axis=0)
        secs = np.mean([r["seconds"] for r in sel])
        lines.append(f"| {arm} | {float(frac):.0%} | {s['mean']:.3f} ± {s['ci95']:.3f} "
                     f"({s['n']}) | " + " | ".join(f"{v:.2f}" for v in per) + f" | {secs:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(SETTINGS), default="brain")
    p.add_argument("--work", type=Path, required=True, help="working folder (resumable)")
    p.add_argument("--arms", nargs="+", default=["plain", "ours", "unet"],
                   help="plain, ours, unet, or init:NAME=EXPORT_DIR (a pretrained arm)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                   help="a FinetuneConfig field for the arms that run through finetune, e.g. "
                   "backbone_lr_scale=0.1 (repeatable)")
    p.add_argument("--abdomen-source", type=Path, default=None, metavar="DIR",
                   help="abdomen: the folder with TotalSegmentator's example_ct_sm.nii.gz and "
                   "example_seg.nii.gz (tests/reference_files of its public repository)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--model", default="micro", help="our preset for the scratch arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--phantom-train", type=int, default=8)
    p.add_argument("--phantom-val", type=int, default=3)
    p.add_argument("--doc", action="store_true", help="write the section of docs/benchmarks.md")
    a = p.parse_args(argv)
    a.options = {k: json.loads(v) for k, _, v in (o.partition("=") for o in a.option)}
    work = a.work.resolve() / a.dataset
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if a.dataset == "brain":
        data = write_brain_set(work / "data", a.work.resolve() / "cache")
    elif a.dataset == "abdomen":
        if a.abdomen_source is None:
            p.error("--dataset abdomen needs --abdomen-source DIR")
        data = write_abdomen_set(work / "data", a.abdomen_source)
    else:
        data = write_phantom_set(work / "data", a.phantom_train, a.phantom_val,
                                 lateral=a.dataset == "phantom-lateral")
    rows = []
    for fraction in a.fractions:
        for seed in a.seeds:
            for spec in a.arms:
                arm, init = spec, None
                if spec.startswith("init:"):
                    arm, _, path = spec[5:].partition("=")
                    init = Path(path)
                run = work / "runs" / f"{arm}-f{fraction}-s{seed}"
                done = run / "row.json"
                if not done.exists():
                    row = run_arm(arm, init, data, run, a, seed, fraction)
                    done.write_text(json.dumps(row))
                row = json.loads(done.read_text())
                rows.append(row)
                print(f"{arm:12s} f={fraction:<4} seed {seed}: dice {row['dice_mean']:.3f} "
                      f"({row['seconds']:.0f} s)", flush=True)
    summary = summarise(rows)
    best = {k: v["mean"] for k, v in summary.items()}
    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "rows": rows, "summary": summary,
        "summary_line": ", ".join(f"{k} {v:.3f}" for k, v in best.items()),
        "wall_seconds": time.perf_counter() - started, "load": os.getloadavg()[0],
        "command": "python benchmarks/bench_finetune.py " + " ".join(argv or sys.argv[1:]),
    }
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))
    if a.doc:
        doc = REPO / "docs" / "benchmarks.md"
        heading = "## Fine-tuning against a plain MONAI loop"
        text = doc.read_text() if doc.exists() else ""
        intro = (f"{heading}\n\nEvery arm: the same labelled volumes, {a.steps} steps, batch "
                 f"{a.batch}, AdamW lr {a.lr} with {a.warmup} warm-up steps, the dataset's patch "
                 "and spacing (`benchmarks/bench_finetune.py`). 'plain' is a MONAI U-Net "
                 "(16-32-64-128, 2 residual units) in a plain MONAI loop that shares no code "
                 "with `finetune` (`benchmarks/plain_monai_seg.py`); 'unet' is the same U-Net "
                 "trained through `finetune`; 'ours' the micro MiT + segmentation head from "
                 "scratch with `finetune`'s defaults; other arms start from a pretrained export. "
                 "Dice: foreground mean on the validation set, 95 % t-interval over seeds.\n")
        sections = _dataset_sections(text, heading)
        sections[a.dataset] = markdown(results)
        replace_section(doc, heading, intro + "\n" + "\n\n".join(sections[k] for k in
                                                                 sorted(sections)))
    return 0


def _dataset_sections(text: str, heading: str) -> dict[str, str]:
    """The per-dataset ``### name:`` blocks already in the section, to keep the other one."""
    if heading not in text:
        return {}
    body = text.split(heading, 1)[1].split("\n## ", 1)[0]
    out = {}
    for block in body.split("\n### ")[1:]:
        name = block.split(":", 1)[0].strip()
        out[name] = "### " + block.strip("\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
