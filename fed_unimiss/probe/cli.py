"""``fed-unimiss probe``: what a frozen encoder has learned, in seconds (k-NN + linear probe)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        help="k-NN and linear probe of a frozen encoder, per stage, against a random one",
        description="Score the frozen encoder's features per stage: a cosine k-NN (k = 20, "
        "DINO's exp(sim / 0.07) vote) and a linear classifier, trained on --train and scored "
        "on --val by balanced accuracy, per voxel for segmentation and per image for "
        "classification. A random encoder of the same shape is probed in the same run as the "
        "reference. Folders are read as `fed-unimiss finetune` reads them. Writes "
        "OUT/metrics.json (mean and 95 %% t-interval over --seeds).",
    )
    p.add_argument("--init", required=True, metavar="DIR|CKPT|random",
                   help="a directory written by `fed-unimiss export`, a pretraining checkpoint "
                   "(ckpt_STEP / global_round_NNNN .safetensors or .json), or 'random' (only "
                   "the random reference, of --model)")
    p.add_argument("--task", choices=("seg3d", "seg2d", "cls3d", "cls2d"), default=None,
                   help="seg: per voxel (pixel); cls: per image (default: from --config)")
    p.add_argument("--train", type=Path, required=True, metavar="DIR",
                   help="labelled folder the k-NN and the linear probe learn from")
    p.add_argument("--val", type=Path, required=True, metavar="DIR",
                   help="labelled folder they are scored on")
    p.add_argument("--out", type=Path, required=True, metavar="RUN", help="writes RUN/metrics.json")
    p.add_argument("--config", type=Path, default=None, metavar="YAML",
                   help="a ProbeConfig YAML (configs/probe/*.yaml: data settings under data:, "
                   "as a finetune config); flags override it")
    p.add_argument("--model", default=None,
                   help="architecture of --init random (preset name or model YAML)")
    p.add_argument("--which", choices=("student", "teacher"), default=None,
                   help="network of a checkpoint (an export names its own)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="voxel samples and random encoders, one per seed (default 0 1 2); "
                   "three give an interval")
    p.add_argument("--stages", type=int, nargs="+", default=None, metavar="N",
                   help="encoder stages to probe, 1-based (default: all)")
    p.add_argument("--k", type=int, default=None, help="neighbours of the k-NN vote (20)")
    p.add_argument("--voxels-per-class", type=int, default=None, metavar="N",
                   help="voxels sampled per class and volume (64); more: steadier, slower")
    p.add_argument("--no-random", action="store_true",
                   help="skip the random reference row (halves the time)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)


def _print_table(metrics: dict) -> None:
    rows = [(name, metrics[name]) for name in ("encoder", "random") if name in metrics]
    print(f"{'encoder':<10} {'stage':<7} {'k-NN':>22} {'linear':>22}   (balanced accuracy)")
    for name, row in rows:
        for stage, scores in row["stages"].items():
            cells = []
            for kind in ("knn", "linear"):
                ba = scores[kind]["balanced_accuracy"]
                spread = f" [{ba['low']:.3f}, {ba['high']:.3f}]" if ba["low"] is not None else ""
                cells.append(f"{ba['mean']:.3f}{spread}")
            print(f"{name:<10} {stage:<7} {cells[0]:>22} {cells[1]:>22}")


def run(args: argparse.Namespace) -> int:
    from fed_unimiss.checkpoint import CheckpointError
    from fed_unimiss.config import ConfigError, replace
    from fed_unimiss.data.sample import DataError
    from fed_unimiss.finetune.export import ExportError
    from fed_unimiss.finetune.load import LoadError

    from .config import ProbeConfig, load_probe_config
    from .run import run_probe

    try:
        cfg = load_probe_config(args.config) if args.config else ProbeConfig()
        cfg = replace(cfg, data=replace(cfg.data, task=args.task), which=args.which,
                      seeds=tuple(args.seeds) if args.seeds else None, k=args.k,
                      stages=tuple(args.stages) if args.stages else None,
                      voxels_per_class=args.voxels_per_class, threads=args.threads,
                      random_reference=False if args.no_random else None)
        cfg.validate()
    except (ConfigError, ValueError) as e:
        log.error("%s", e)
        return 2
    init = None if args.init == "random" else Path(args.init)
    if init is not None and not init.exists():
        log.error("--init %s: no such export directory or checkpoint", init)
        return 2
    if init is None and args.no_random:
        log.error("--init random with --no-random leaves nothing to probe")
        return 2
    try:
        metrics = run_probe(cfg, init, args.train, args.val, args.out, model=args.model)
    except (DataError, LoadError, ExportError, CheckpointError, ConfigError, ValueError) as e:
        log.error("%s", e)
        return 2
    _print_table(metrics)
    print(f"{cfg.data.task}: {metrics['items']['train']} training / {metrics['items']['val']} "
          f"validation items, {metrics['seconds']} s -> {args.out / 'metrics.json'}")
    return 0
