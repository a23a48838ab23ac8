"""The quality benchmark on real inputs (``run_quality.py --data real``).

Pretraining data, all public and already on disk (nothing is downloaded here):

- site **A** (chest and abdomen CT): the UniMiSS repository's example CT, i.e. 11 DeepLesion
  sub-volumes and one RICORD chest CT (``--real-unlabelled DIR``: its ``ct/`` folder);
- site **B** (X-rays and head CT): the same repository's 7 NIH chest X-rays (``DIR/xray``) and
  the head CTs of ../shared/data/fetch-real-samples.sh (``--real-ct DIR``: ``headct.nii.gz``,
  ``fullhead-ct/``, ``sinus-ct-dicom/``).

Arms, per pretraining seed, the same number of optimiser steps each: ``central`` (A + B pooled,
2D + 3D), ``central_3d`` (the CT of A and B only), ``federated`` (``fed-unimiss simulate`` with
sites A and B, rounds x local steps x 2 sites = the central steps, the shipped exchange).
Downstream: TotalSegmentator's example abdominal CT with six organs, left and right kidney apart
(benchmarks/finetune_data.py ``write_abdomen_set``: 3 training slabs, 2 validation slabs),
scored by ``fed-unimiss probe`` on each export and by ``fed-unimiss finetune --task seg3d`` at
1, 2 and 3 labelled slabs, fine-tuning seed s starting from the export of pretraining seed s.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from finetune_data import ABDOMEN_NAMES, write_abdomen_set  # noqa: E402

CT_SPACING = [2.0, 3.0, 3.0]  # = micro-real.yaml and bench_finetune.py SETTINGS["abdomen"]
PATCH = [8, 48, 48]
NUM_CLASSES = 7
CLASS_NAMES = ["background", *ABDOMEN_NAMES]
HEAD_CT = ["headct.nii.gz", "fullhead-ct", "sinus-ct-dicom"]
PRETRAINED_ARMS = ["central", "federated", "central_3d"]
SITES = 2


def _link(dst: Path, src: Path) -> None:
    """A symbolic link to the public input (the scan follows links; nothing is copied)."""
    if not src.exists():
        raise SystemExit(f"{src}: missing real input (see benchmarks/quality/real_inputs.py)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_symlink():
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def make_real_data(work: Path, a: argparse.Namespace) -> dict[str, Path]:
    """Sites A and B (B's CT in its own sub-folder for the 3D-only arm) and the abdomen set."""
    d = work / "data"
    _link(d / "siteA" / "ct-chest", a.real_unlabelled / "ct")
    _link(d / "siteB" / "xray", a.real_unlabelled / "xray")
    for name in HEAD_CT:
        _link(d / "siteB" / "ct" / name, a.real_ct / name)
    abdomen = write_abdomen_set(d / "abdomen", a.abdomen_source)
    return {"A": d / "siteA", "B": d / "siteB", "B_ct": d / "siteB" / "ct",
            "train": abdomen / "train", "val": abdomen / "val"}


def shipped_pretrained_start() -> dict:
    """How configs/finetune/seg3d-micro.yaml keeps a pretrained start (the FinetuneConfig
    options that act only from a pretrained init), read rather than restated."""
    shipped = yaml.safe_load((REPO / "configs" / "finetune" / "seg3d-micro.yaml").read_text())
    keys = ("backbone_lr_scale", "layer_decay", "decoder_init", "freeze_backbone_steps")
    return {k: shipped[k] for k in keys if k in shipped}


def write_real_configs(work: Path, a: argparse.Namespace) -> dict[str, Path]:
    """Per pretraining seed a recipe and a federation; one probe and one fine-tuning config."""
    base = yaml.safe_load((HERE / "micro-real.yaml").read_text())
    paths: dict[str, Path] = {}
    for seed in a.pretrain_seeds:
        recipe = copy.deepcopy(base)
        ssl = recipe["ssl"]
        ssl["seed"] = seed
        ssl["steps_per_epoch"] = a.local_steps
        ssl["epochs"] = max(1, a.pretrain_steps // a.local_steps)
        ssl["warmup_epochs"] = min(ssl["warmup_epochs"], ssl["epochs"])
        ssl["freeze_last_layer"] = ssl["epochs"]  # the recipe's fixed prototypes, whole run
        ssl["checkpoint_every"] = a.pretrain_steps
        ssl["threads"] = 1
        paths[f"recipe-p{seed}"] = work / f"pretrain-p{seed}.yaml"
        paths[f"recipe-p{seed}"].write_text(yaml.safe_dump(recipe, sort_keys=False))
        fed = yaml.safe_load((REPO / "configs" / "federation" / "micro.yaml").read_text())
        fed["recipe"] = str(paths[f"recipe-p{seed}"])
        fed["recipe_overrides"] = {"ssl": {"threads": 1}}  # the recipe's batches, as central
        fed["local_steps"] = a.local_steps
        fed["min_sites"] = SITES
        fed["evaluate"] = False
        paths[f"federation-p{seed}"] = work / f"federation-p{seed}.yaml"
        paths[f"federation-p{seed}"].write_text(yaml.safe_dump(fed, sort_keys=False))
    data = {"task": "seg3d", "model": "micro", "num_classes": NUM_CLASSES,
            "patch_3d": PATCH, "ct_spacing": CT_SPACING, "hu_scale": 1024.0,
            "class_names": CLASS_NAMES}
    paths["probe"] = work / "probe.yaml"
    paths["probe"].write_text(yaml.safe_dump({"data": data}, sort_keys=False))
    # bench_finetune.py's abdomen settings, how seg3d-micro.yaml keeps a pretrained start;
    # everything else the shipped FinetuneConfig defaults.
    ft = {**data, "epochs": 1, "steps_per_epoch": a.steps_per_epoch, "batch_size": 2,
          "lr": a.lr, "warmup_steps": min(20, a.steps_per_epoch // 10), "foreground_prob": 0.5,
          "sw_overlap": 0.25, "val_every": 1, "threads": 1, **shipped_pretrained_start()}
    paths["finetune"] = work / "finetune.yaml"
    paths["finetune"].write_text(yaml.safe_dump(ft, sort_keys=False))
    return paths


def _in_parallel(one, jobs: list[tuple], at_once: int) -> None:
    """``one(*job)`` for every job, ``at_once`` at a time (each runs a subprocess); on a
    failure the jobs not yet started are dropped and the error is raised."""
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = [pool.submit(one, *job) for job in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def pretrain_real(work: Path, a, sites, paths, cli: list[str], run, logs: Path) -> dict:
    """Every (arm, pretraining seed): pretrain (or simulate), export the student."""
    rounds = max(1, a.pretrain_steps // (SITES * a.local_steps))
    steps = ["--steps", str(a.pretrain_steps), "--no-progress"]
    todo, out = [], {}
    for seed in a.pretrain_seeds:
        recipe, fed = str(paths[f"recipe-p{seed}"]), str(paths[f"federation-p{seed}"])
        cmds = {
            "central": [*cli, "pretrain", "--config", recipe, "--data", str(sites["A"]),
                        "--data", str(sites["B"]), *steps],
            "central_3d": [*cli, "pretrain", "--config", recipe, "--data", str(sites["A"]),
                           "--data", str(sites["B_ct"]), *steps],
            "federated": [*cli, "simulate", "--config", fed, "--site", f"A={sites['A']}",
                          "--site", f"B={sites['B']}", "--rounds", str(rounds)],
        }
        for arm in PRETRAINED_ARMS:
            if arm in a.arms:
                todo.append((f"{arm}-p{seed}", arm, cmds[arm]))

    def one(name: str, arm: str, cmd: list[str]) -> None:
        pre, export = work / "pretrain" / name, work / "exports" / name
        if a.collect_only and not (export / ".done").exists():
            missing.append(f"pretrain {name}")
            return
        if not (pre / ".done").exists():
            seconds = run([*cmd, "--out", str(pre)], logs / f"pretrain-{name}.log")
            (pre / ".done").write_text(json.dumps({"seconds": seconds}))
        prefix = "global_round_" if arm == "federated" else "ckpt_"
        ckpt = sorted(pre.glob(f"{prefix}*.safetensors"))[-1]
        if not (export / ".done").exists():
            run([*cli, "export", str(ckpt), "--out", str(export), "--which", "student"],
                logs / f"export-{name}.log")
            (export / ".done").write_text("")
        out[name] = {"arm": arm, "dir": export, "checkpoint": ckpt.name,
                     "pretrain_seconds": json.loads((pre / ".done").read_text())["seconds"],
                     **({"rounds": rounds} if arm == "federated" else {})}

    missing: list[str] = []
    _in_parallel(one, todo, a.jobs)
    a.missing += sorted(missing)
    return dict(sorted(out.items()))


def _probe_rows(metrics: dict, arm: str, seed: int, row: str) -> list[dict]:
    return [{"arm": arm, "seed": seed, "stage": int(stage.removeprefix("stage")),
             "knn": scores["knn"]["balanced_accuracy"]["mean"],
             "linear": scores["linear"]["balanced_accuracy"]["mean"]}
            for stage, scores in metrics[row]["stages"].items()]


def probe_real(work: Path, a, sites, paths, exports: dict, cli: list[str], run, logs: Path
               ) -> list[dict]:
    """``fed-unimiss probe`` of every export with probe seed = pretraining seed; the random
    encoder of the same seed (the probe's reference row) is the ``random`` arm."""
    jobs = []
    for name, e in exports.items():
        seed = int(name.rsplit("-p", 1)[1])
        out = work / "probe" / name
        cmd = [*cli, "probe", "--config", str(paths["probe"]), "--init", str(e["dir"]),
               "--train", str(sites["train"]), "--val", str(sites["val"]), "--out", str(out),
               "--seeds", str(seed), "--threads", "1"]
        jobs.append((name, e["arm"], seed, out, cmd))

    def one(name, arm, seed, out, cmd) -> None:
        if not (out / "metrics.json").exists() and not a.collect_only:
            run(cmd, logs / f"probe-{name}.log")

    _in_parallel(one, jobs, a.jobs)
    rows, random_seeds = [], set()
    for name, arm, seed, out, _ in jobs:
        if not (out / "metrics.json").exists():
            a.missing.append(f"probe {name}")
            continue
        m = json.loads((out / "metrics.json").read_text())
        rows += _probe_rows(m, arm, seed, "encoder")
        if seed not in random_seeds and "random" in m:  # the same encoder in every probe
            rows += _probe_rows(m, "random", seed, "random")
            random_seeds.add(seed)
    return rows


def finetune_real(work: Path, a, sites, paths, exports: dict, cli: list[str], run,
                  logs: Path) -> list[dict]:
    """Fine-tune from scratch and from each export; seed s starts from pretraining seed s."""
    jobs = []
    for frac in a.fractions:
        for seed in a.seeds:
            for arm in a.arms:
                out = work / "finetune" / f"{arm}-f{frac:.3f}-s{seed}"
                init = "scratch" if arm == "scratch" else exports.get(f"{arm}-p{seed}", {}).get("dir")
                if init is None:
                    a.missing.append(f"finetune {out.name}")
                    continue
                cmd = [*cli, "finetune", "--config", str(paths["finetune"]), "--task", "seg3d",
                       "--init", str(init), "--train", str(sites["train"]), "--val",
                       str(sites["val"]), "--out", str(out), "--label-fraction", str(frac),
                       "--seed", str(seed)]
                jobs.append((arm, frac, seed, out, cmd))

    def one(arm, frac, seed, out, cmd) -> None:
        if not (out / "metrics.json").exists() and not a.collect_only:
            run(cmd, logs / f"finetune-{out.name}.log")
            m = json.loads((out / "metrics.json").read_text())
            print(f"{arm:12s} {m['data']['train_items']} labelled, seed {seed}: "
                  f"dice_mean {m['dice_mean']:.4f}", flush=True)

    _in_parallel(one, jobs, a.jobs)
    rows = []
    for arm, frac, seed, out, _ in jobs:
        if not (out / "metrics.json").exists():
            a.missing.append(f"finetune {out.name}")
            continue
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"arm": arm, "fraction": frac, "seed": seed, "dice_mean": m["dice_mean"],
                     "dice_per_class": m["dice_per_class"],
                     "train_items": m["data"]["train_items"],
                     "train_seconds": sum(h["train_seconds"] for h in m["history"])})
    return rows


def span_seconds(work: Path, first_start: float) -> float:
    """Seconds from the first launch to the newest finished step (over resumed sessions)."""
    done = [*work.glob("pretrain/*/.done"), *work.glob("probe/*/metrics.json"),
            *work.glob("finetune/*/metrics.json")]
    return max((f.stat().st_mtime for f in done), default=first_start) - first_start
