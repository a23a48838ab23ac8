"""``fed-unimiss finetune``: fine-tune an exported model (or a scratch one) on a 2D/3D task."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fed_unimiss.cli.runtime_args import add_runtime_arguments, runtime_from_args

log = logging.getLogger(__name__)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained model on a 2D/3D task",
        description="Fine-tune on labelled data and write RUN/metrics.json (final validation "
        "metrics + per-epoch history). Segmentation folders hold NAME.nii.gz + "
        "NAME_label.nii.gz (or NAME.png + NAME_label.png), or are a Decathlon / nnU-Net folder "
        "(dataset.json + imagesTr/labelsTr); classification folders hold labels.csv "
        "(file,label[,patient]) or NIH's Data_Entry_2017.csv. The paper's benchmarks: "
        "configs/finetune/<benchmark>.yaml, docs/reproduce.md.",
    )
    p.add_argument("--task", choices=("seg3d", "seg2d", "cls3d", "cls2d"), default=None,
                   help="seg3d: CT organ segmentation; seg2d: 2D segmentation (PNG pairs or CT "
                   "slices); cls3d/cls2d: CT / X-ray classification (default: from --config)")
    p.add_argument("--init", required=True, metavar="DIR|scratch",
                   help="a directory written by `fed-unimiss export`, or 'scratch'")
    p.add_argument("--train", type=Path, required=True, metavar="DIR",
                   help="labelled training folder (layouts: docs/researcher-guide.md)")
    p.add_argument("--val", type=Path, required=True, metavar="DIR",
                   help="labelled validation folder, evaluated whole (sliding window for seg)")
    p.add_argument("--out", type=Path, required=True, metavar="RUN",
                   help="run folder: metrics.json, history.jsonl, finetuned.safetensors")
    p.add_argument("--config", type=Path, default=None, metavar="YAML",
                   help="a FinetuneConfig YAML (configs/finetune/*.yaml); flags override it")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (steps per epoch: the config's steps_per_epoch)")
    p.add_argument("--label-fraction", type=_fraction, default=None, metavar="F",
                   help="use a seeded subset of this fraction of the labelled training cases")
    p.add_argument("--mode", choices=("full", "linear"), default=None,
                   help="full fine-tuning (the paper's protocol) or a frozen-backbone probe")
    p.add_argument("--seed", type=int, default=None,
                   help="picks the label subset, the patches and the new layers' init")
    p.add_argument("--model", default=None,
                   help="architecture for --init scratch (preset name or model YAML)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (1e-4 reference; try 1e-3 for linear/scratch)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes incl. background; default: max training label + 1")
    p.add_argument("--steps-per-epoch", type=int, default=None, metavar="N",
                   help="optimiser steps per epoch (default: one pass over the training items)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="training batch size; lower it when memory runs out")
    p.add_argument("--patch-3d", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="3D patch / sliding window / cls3d input size (smaller: less memory)")
    p.add_argument("--size-2d", type=int, default=None, metavar="S",
                   help="2D crop / sliding window side, and the cls2d input side")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (at most the cores you are given)")
    add_runtime_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fed_unimiss.config import ConfigError, replace
    from fed_unimiss.data.sample import DataError

    from .config import FinetuneConfig, load_finetune_config
    from .load import LoadError
    from .trainer import finetune

    try:
        cfg = load_finetune_config(args.config) if args.config else FinetuneConfig()
        cfg = replace(cfg, task=args.task, epochs=args.epochs, label_fraction=args.label_fraction,
                      mode=args.mode, seed=args.seed, model=args.model, lr=args.lr,
                      num_classes=args.num_classes, steps_per_epoch=args.steps_per_epoch,
                      batch_size=args.batch_size, size_2d=args.size_2d, threads=args.threads,
                      patch_3d=tuple(args.patch_3d) if args.patch_3d else None)
        cfg.validate()
        runtime = runtime_from_args(args)
    except (ConfigError, ValueError) as e:
        log.error("%s", e)
        return 2
    init = None if args.init == "scratch" else Path(args.init)
    try:
        metrics = finetune(cfg, init, args.train, args.val, args.out, runtime=runtime)
    except (DataError, LoadError, ConfigError, FloatingPointError) as e:
        log.error("%s", e)
        return 2
    key = "dice_mean" if cfg.is_segmentation else "auc"
    for name, per in (("AUC", "auc_per_class"), ("Dice", "dice_per_label")):
        if isinstance(metrics.get(per), dict):  # the per-class report, one line per class
            for label, value in metrics[per].items():
                shown = "n/a (one kind of case only)" if value is None else f"{value:.4f}"
                print(f"  {name} {label:<24} {shown}")
    print(f"{cfg.task}: final {key} = {metrics.get(key)} -> {args.out / 'metrics.json'}")
    print(json.dumps({k: metrics[k] for k in metrics if k not in ("history", "config")},
                     indent=1, default=str)[:2000])
    return 0
