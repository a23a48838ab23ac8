"""Quality benchmark: does (federated) UniMiSS pretraining help a 3D segmentation task?

Arms, all fine-tuned on the same labelled phantom CT set with the same budget, at label fractions
(default 10 % and 100 %) and seeds (default 0, 1, 2):

- ``scratch``       the micro MiT from random initialisation;
- ``central``       centralized pretraining on the pooled data of the three sites (2D + 3D);
- ``federated``     federated pretraining over three non-IID sites - A: CT only, B: X-ray only,
                    C: both - with the same total number of optimiser steps as ``central``
                    (rounds x local_steps x 3 sites = central steps);
- ``central_3d``    centralized pretraining on the CT of the same sites only (3D only), same
                    steps: 2D+3D vs 3D-only on the 3D task, the paper's central claim;
- ``central_teacher`` the teacher of ``central`` (student vs teacher as a starting point);
- ``federated_fp32`` ``federated`` with the uncompressed exchange (fp32 both ways) instead of
                    the shipped one (int8 deltas both ways): does compression cost quality?

Every step goes through the project's own commands (``fed-unimiss data phantom``,
``pretrain``, ``simulate``, ``export``, ``finetune``) in subprocesses, so the benchmark
measures what users run. Results: ``WORK/results.json``; ``report.py`` turns them into the
section of docs/quality.md and the plot docs/quality.png.

    python benchmarks/quality/run_quality.py --size small --work /tmp/quality   # ~1 h, 2 cores
    python benchmarks/quality/run_quality.py --size medium --work /tmp/quality \
        --real-ct .cache/real-samples                                           # ~1 h
    python benchmarks/quality/run_quality.py --size long --work /tmp/quality-long \
        --real-ct .cache/real-samples                                           # a few hours
    python benchmarks/quality/run_quality.py --size full --work runs/quality    # hours
    python benchmarks/quality/run_quality.py --size real --work /tmp/quality-real \
        --real-unlabelled /tmp/unimiss-data --real-ct /tmp/real-samples \
        --abdomen-source /tmp/realct                                            # ~1.5 h
    python benchmarks/quality/report.py --work /tmp/quality

Sizes are presets of the flags below (any flag overrides its preset value). The ``real`` sizes
(``--data real``) pretrain on real unlabelled CT and X-rays, once per ``--pretrain-seeds`` seed,
and fine-tune on a real abdominal CT: see real_inputs.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "fed_unimiss.cli.main"]
# The project's fine-tuning lr for the micro seg3d task, read rather than restated, so the real
# sizes follow the shipped default (docs/benchmarks.md, "Fine-tuning against a plain MONAI loop").
SHIPPED_LR = float(yaml.safe_load(
    (REPO / "configs" / "finetune" / "seg3d-micro.yaml").read_text())["lr"])

SIZES = {
    # About an hour on 2 busy shared CPU cores: a smoke-sized version of the experiment.
    "small": dict(ct_per_site=4, xray_per_site=12, train_ct=8, val_ct=2, pretrain_steps=24,
                  local_steps=4, epochs=3, steps_per_epoch=4, seeds=[0, 1, 2],
                  fractions=[0.1, 1.0]),
    # The run in docs/quality.md (about an hour on 2 cores): pretraining long enough for the
    # teacher to learn (docs/pretraining.md), fine-tuning long enough for scratch to be well
    # above the floor, few labels (one volume of eight), five seeds, no teacher arm.
    "medium": dict(ct_per_site=6, xray_per_site=24, train_ct=8, val_ct=3, pretrain_steps=300,
                   local_steps=10, epochs=1, steps_per_epoch=200, seeds=[0, 1, 2, 3, 4],
                   fractions=[0.125], arms=["scratch", "central", "federated", "central_3d"]),
    # The medium protocol with about seven times the pretraining (2100 optimiser steps per arm,
    # federated 35 rounds x 20 local steps x 3 sites) and a third more unlabelled data: does the
    # effect show once the teacher has had time to learn? A few CPU hours on 2 cores.
    "long": dict(ct_per_site=8, xray_per_site=32, train_ct=8, val_ct=3, pretrain_steps=2100,
                 local_steps=20, epochs=1, steps_per_epoch=200, seeds=[0, 1, 2, 3, 4],
                 fractions=[0.125], arms=["scratch", "central", "federated", "central_3d",
                                          "federated_fp32"]),
    # For a machine with more CPU time: more data, longer pretraining and fine-tuning.
    "full": dict(ct_per_site=24, xray_per_site=96, train_ct=40, val_ct=10, pretrain_steps=600,
                 local_steps=10, epochs=30, steps_per_epoch=20, seeds=[0, 1, 2, 3, 4],
                 fractions=[0.1, 0.25, 1.0]),
    # Real inputs (real_inputs.py), sized for about 1.5 h on 2 shared cores: 3 pretraining
    # seeds x 3 arms of 300 steps (federated 15 rounds x 10 local steps x 2 sites), the probe,
    # and fine-tuning at 1, 2 and 3 labelled slabs for 400 steps at the shipped seg3d lr
    # (SHIPPED_LR), two subprocesses at a time. All 3 slabs run first: a run cut short still
    # holds the setting of docs/benchmarks.md's abdomen rows whole (the report sorts by count).
    "real": dict(data="real", pretrain_steps=300, local_steps=10, epochs=1, steps_per_epoch=400,
                 lr=SHIPPED_LR, pretrain_seeds=[0, 1, 2], fractions=[1.0, 1 / 3, 2 / 3], jobs=2,
                 arms=["scratch", "central", "federated", "central_3d"]),
    # A few steps of everything on the real inputs: checks the pipeline end to end.
    "real-tiny": dict(data="real", pretrain_steps=4, local_steps=2, epochs=1, steps_per_epoch=4,
                      lr=SHIPPED_LR, pretrain_seeds=[0, 1], fractions=[1 / 3, 1.0], jobs=2,
                      arms=["scratch", "central", "federated", "central_3d"]),
}
# The phantom sizes keep the lr their runs in docs/quality.md were measured with.
PHANTOM_LR = 1e-3

# Data grid shared by pretraining and fine-tuning: phantom CT (~1.8 mm pixels, 128^2) at
# 3 x 3.5 x 3.5 mm is ~37 x 66 x 66 voxels, so sliding-window validation stays cheap on CPU.
CT_SPACING = [3.0, 3.5, 3.5]
PATCH = [8, 48, 48]  # = the micro recipe's 3D view (view_depth 8, view_size 48)


def _run(cmd: list[str], log: Path) -> float:
    """Run one project command, its output to ``log``; raise with the log tail on failure."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - start


def _phantom(out: Path, ct: int, xray: int, seed: int, labels: bool, logs: Path) -> Path:
    if not (out / ".done").exists():
        cmd = [*CLI, "data", "phantom", str(out), "--ct", str(ct), "--xray", str(xray),
               "--seed", str(seed), "--format", "nifti"] + (["--labels"] if labels else [])
        _run(cmd, logs / f"phantom-{out.name}.log")
        (out / ".done").write_text("")
    return out


def _add_real_ct(site: Path, real: Path, names: list[str]) -> None:
    """Copy real unlabelled CT (fetch-real-samples.sh) into a pretraining site's folder."""
    import shutil

    for name in names:
        src, dst = real / name, site / "real" / name
        if dst.exists() or not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def make_data(work: Path, a: argparse.Namespace, logs: Path) -> dict[str, Path]:
    """Three non-IID pretraining sites (+ C split by modality) and the labelled seg3d set.

    With ``--real-ct DIR`` (the folder of ../shared/data/fetch-real-samples.sh) site A also holds
    the real head CT NIfTI and MetaImage and site C's CT the real sinus DICOM series.
    """
    d = work / "data"
    sites = {
        "A": _phantom(d / "siteA", a.ct_per_site, 0, 101, False, logs),  # CT only
        "B": _phantom(d / "siteB", 0, a.xray_per_site, 102, False, logs),  # X-ray only
    }
    # Site C holds both kinds; its CT and X-rays sit in two sub-folders so that the 3D-only arm
    # can pool exactly the CT the other arms see.
    _phantom(d / "siteC" / "ct", a.ct_per_site, 0, 103, False, logs)
    _phantom(d / "siteC" / "xray", 0, a.xray_per_site, 104, False, logs)
    sites["C"] = d / "siteC"
    sites["C_ct"] = d / "siteC" / "ct"
    if a.real_ct is not None:
        _add_real_ct(sites["A"], a.real_ct, ["headct.nii.gz", "fullhead-ct"])
        _add_real_ct(sites["C_ct"], a.real_ct, ["sinus-ct-dicom"])
    sites["train"] = _phantom(d / "seg-train", a.train_ct, 0, 201, True, logs)
    sites["val"] = _phantom(d / "seg-val", a.val_ct, 0, 202, True, logs)
    return sites


def write_configs(work: Path, a: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The pretraining recipe (micro, at the benchmark's CT spacing), federation and finetune."""
    recipe = yaml.safe_load((REPO / "configs" / "pretrain" / "micro.yaml").read_text())
    recipe["data"]["ct_spacing"] = CT_SPACING
    recipe["ssl"]["steps_per_epoch"] = a.local_steps
    recipe["ssl"]["epochs"] = max(1, a.pretrain_steps // a.local_steps)
    recipe["ssl"]["warmup_epochs"] = min(recipe["ssl"]["warmup_epochs"], recipe["ssl"]["epochs"])
    recipe["ssl"]["checkpoint_every"] = a.pretrain_steps
    recipe["ssl"]["threads"] = 1  # 2 threads on 2 shared cores oversubscribe badly
    recipe_path = work / "pretrain.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    fed = yaml.safe_load((REPO / "configs" / "federation" / "micro.yaml").read_text())
    fed["recipe"] = str(recipe_path)
    # Same batches as centralized; each site's schedule spans rounds x local_steps.
    fed["recipe_overrides"] = {"ssl": {"threads": 1}}
    fed["local_steps"] = a.local_steps
    fed["min_sites"] = 3
    fed["evaluate"] = False
    fed_path = work / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(fed, sort_keys=False))
    fed["exchange"] = {"down": "fp32", "up": "fp32", "teacher": "exchanged"}
    (work / "federation-fp32.yaml").write_text(yaml.safe_dump(fed, sort_keys=False))
    ft = {"task": "seg3d", "model": "micro", "num_classes": 6, "epochs": a.epochs,
          "steps_per_epoch": a.steps_per_epoch, "batch_size": 2, "lr": a.lr,
          "patch_3d": PATCH, "ct_spacing": CT_SPACING,
          "foreground_prob": 0.5, "sw_overlap": 0.25, "val_every": a.epochs, "threads": 1,
          "warmup_steps": min(20, a.epochs * a.steps_per_epoch // 10)}
    ft_path = work / "finetune.yaml"
    ft_path.write_text(yaml.safe_dump(ft, sort_keys=False))
    return recipe_path, fed_path, ft_path


def pretrain_arms(work: Path, a, sites, recipe: Path, fed: Path, logs: Path) -> dict[str, dict]:
    """Run the three pretrainings and export them; returns arm -> {dir, seconds}."""
    out: dict[str, dict] = {}
    runs = work / "pretrain"
    jobs = {
        "central": [*CLI, "pretrain", "--config", str(recipe), "--data", str(sites["A"]),
                    "--data", str(sites["B"]), "--data", str(sites["C"]),
                    "--steps", str(a.pretrain_steps), "--no-progress"],
        "central_3d": [*CLI, "pretrain", "--config", str(recipe), "--data", str(sites["A"]),
                       "--data", str(sites["C_ct"]), "--steps", str(a.pretrain_steps),
                       "--no-progress"],
    }
    rounds = max(1, a.pretrain_steps // (3 * a.local_steps))
    for arm, config in (("federated", fed), ("federated_fp32", fed.with_name("federation-fp32.yaml"))):
        if arm == "federated" or arm in a.arms:
            jobs[arm] = [*CLI, "simulate", "--config", str(config), "--site", f"A={sites['A']}",
                         "--site", f"B={sites['B']}", "--site", f"C={sites['C']}",
                         "--rounds", str(rounds)]
    for arm, cmd in jobs.items():
        run = runs / arm
        seconds = None
        if not (run / ".done").exists():
            seconds = _run([*cmd, "--out", str(run)], logs / f"pretrain-{arm}.log")
            (run / ".done").write_text(json.dumps({"seconds": seconds}))
        seconds = json.loads((run / ".done").read_text())["seconds"]
        prefix = "global_round_" if arm.startswith("federated") else "ckpt_"
        ckpt = sorted(run.glob(f"{prefix}*.safetensors"))[-1]
        which = [("student", arm)] + ([("teacher", "central_teacher")] if arm == "central" else [])
        for net, name in which:
            export = work / "exports" / name
            _run([*CLI, "export", str(ckpt), "--out", str(export), "--which", net],
                 logs / f"export-{name}.log")
            out[name] = {"dir": export, "pretrain_seconds": seconds, "checkpoint": ckpt.name}
    for arm in ("federated", "federated_fp32"):
        if arm in out:
            out[arm]["rounds"] = rounds
    return out


def finetune_all(work: Path, a, sites, ft_cfg: Path, arms: dict, logs: Path) -> list[dict]:
    rows = []
    inits = {"scratch": None, **{k: v["dir"] for k, v in arms.items()}}
    inits = {k: v for k, v in inits.items() if k in a.arms}
    for frac in a.fractions:
        for seed in a.seeds:
            for arm, init in inits.items():
                run = work / "finetune" / f"{arm}-f{frac}-s{seed}"
                if not (run / "metrics.json").exists():
                    cmd = [*CLI, "finetune", "--config", str(ft_cfg), "--task", "seg3d",
                           "--init", str(init) if init else "scratch", "--train",
                           str(sites["train"]), "--val", str(sites["val"]), "--out", str(run),
                           "--label-fraction", str(frac), "--seed", str(seed)]
                    _run(cmd, logs / f"finetune-{run.name}.log")
                m = json.loads((run / "metrics.json").read_text())
                rows.append({"arm": arm, "fraction": frac, "seed": seed,
                             "dice_mean": m["dice_mean"], "dice_per_class": m["dice_per_class"],
                             "train_items": m["data"]["train_items"],
                             "train_seconds": sum(h["train_seconds"] for h in m["history"])})
                print(f"{arm:16s} frac {frac:<5} seed {seed}: dice_mean {m['dice_mean']:.4f}",
                      flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--work", type=Path, required=True, help="working folder (resumable)")
    p.add_argument("--ct-per-site", type=int)
    p.add_argument("--xray-per-site", type=int)
    p.add_argument("--train-ct", type=int, help="labelled CT volumes for fine-tuning")
    p.add_argument("--val-ct", type=int, help="labelled CT volumes for validation")
    p.add_argument("--pretrain-steps", type=int, help="total optimiser steps of every arm")
    p.add_argument("--local-steps", type=int, help="federated local steps per round")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs")
    p.add_argument("--steps-per-epoch", type=int, help="fine-tuning steps per epoch")
    p.add_argument("--lr", type=float, help="fine-tuning lr, all arms (default: the real "
                   f"sizes the shipped seg3d-micro.yaml lr, {SHIPPED_LR:g}; phantom sizes "
                   f"{PHANTOM_LR:g})")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--fractions", type=float, nargs="+")
    p.add_argument("--arms", nargs="+", help="fine-tuning arms (default: the size's, or all)")
    p.add_argument("--real-ct", type=Path, default=None, metavar="DIR",
                   help="real unlabelled CT for pretraining (fetch-real-samples.sh's folder)")
    p.add_argument("--data", choices=("phantom", "real"), default=None,
                   help="phantom sites and phantom labels, or real inputs (real_inputs.py)")
    p.add_argument("--real-unlabelled", type=Path, default=None, metavar="DIR",
                   help="real mode: the UniMiSS example data (DIR/ct: DeepLesion + RICORD "
                   "NIfTI, DIR/xray: NIH chest X-ray PNGs)")
    p.add_argument("--abdomen-source", type=Path, default=None, metavar="DIR",
                   help="real mode: TotalSegmentator's example_ct_sm.nii.gz + example_seg.nii.gz")
    p.add_argument("--pretrain-seeds", type=int, nargs="+",
                   help="real mode: one pretraining run per seed and arm; fine-tuning seed s "
                   "starts from pretraining seed s (default: --seeds = these)")
    p.add_argument("--jobs", type=int, default=None,
                   help="real mode: subprocesses at a time (default: the size's, or 1)")
    p.add_argument("--collect-only", action="store_true",
                   help="real mode: run nothing, write results.json from the finished steps "
                   "(a partial result lists what is missing)")
    a = p.parse_args(argv)
    for key, value in SIZES[a.size].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.data = a.data or "phantom"
    if a.lr is None:
        a.lr = PHANTOM_LR
    if a.data == "real":
        return main_real(p, a, argv)
    if a.arms is None:
        a.arms = ["scratch", "central", "central_teacher", "federated", "central_3d",
                  "federated_fp32"]
    work = a.work.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sites = make_data(work, a, logs)
    recipe, fed, ft_cfg = write_configs(work, a)
    arms = pretrain_arms(work, a, sites, recipe, fed, logs)
    rows = finetune_all(work, a, sites, ft_cfg, arms, logs)
    settings = {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(a).items()
                if k != "work"}
    results = {
        "settings": settings,
        "ct_spacing": CT_SPACING,
        "patch": PATCH,
        "pretraining": {k: {kk: vv for kk, vv in v.items() if kk != "dir"}
                        for k, v in arms.items()},
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
        "command": "python benchmarks/quality/run_quality.py " + " ".join(argv or sys.argv[1:]),
    }
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results in {work / 'results.json'}")
    return 0


def main_real(p: argparse.ArgumentParser, a: argparse.Namespace, argv: list[str] | None) -> int:
    """The benchmark on real inputs: pretrain x seeds, probe, fine-tune, results.json."""
    import real_inputs as real

    for flag in ("real_unlabelled", "real_ct", "abdomen_source"):
        if getattr(a, flag) is None:
            p.error(f"--data real needs --{flag.replace('_', '-')} DIR")
    a.seeds = a.seeds or a.pretrain_seeds
    if a.pretrain_seeds is None or not set(a.seeds) <= set(a.pretrain_seeds):
        p.error("--seeds: every fine-tuning seed needs the pretraining run of the same seed "
                "(--pretrain-seeds)")
    a.jobs = a.jobs or 1
    a.missing = []
    work = a.work.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    first = work / "started.json"  # the first launch; resumed sessions keep it
    if not first.exists():
        first.write_text(json.dumps({"unix": time.time()}))
    sites = real.make_real_data(work, a)
    paths = real.write_real_configs(work, a)
    exports = real.pretrain_real(work, a, sites, paths, CLI, _run, logs)
    probe_rows = real.probe_real(work, a, sites, paths, exports, CLI, _run, logs)
    rows = real.finetune_real(work, a, sites, paths, exports, CLI, _run, logs)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                if k not in ("work", "missing", "collect_only")}
    results = {
        "settings": settings,
        "missing": a.missing,
        "sites": {"A": "UniMiSS example CT: 11 DeepLesion sub-volumes + 1 RICORD chest CT",
                  "B": "UniMiSS example NIH chest X-rays (7) + head CTs: "
                       + ", ".join(real.HEAD_CT)},
        "ct_spacing": real.CT_SPACING,
        "patch": real.PATCH,
        "pretraining": {k: {kk: vv for kk, vv in v.items() if kk != "dir"}
                        for k, v in exports.items()},
        "probe_rows": probe_rows,
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
        "span_seconds": real.span_seconds(work, json.loads(first.read_text())["unix"]),
        "command": "python benchmarks/quality/run_quality.py " + " ".join(
            x for x in (argv or sys.argv[1:]) if x != "--collect-only"),
    }
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results in {work / 'results.json'}"
          + (f"; not finished: {', '.join(a.missing)}" if a.missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
