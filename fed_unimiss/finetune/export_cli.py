"""``fed-unimiss export CKPT --out DIR [--which student|teacher]``: publish a pretrained model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "torchscript", "monai-bundle")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint as a loadable model",
        description="Write the MiT backbone of a pretraining checkpoint (ckpt_STEP or "
        "global_round_NNNN) as DIR/model.safetensors + DIR/config.json, loadable with "
        "fed_unimiss.load_pretrained(DIR) without Flower, and the model card DIR/README.md "
        "written from the run's records. Only aggregate provenance (rounds, site labels, "
        "sample counts, epsilon per site) is written; no paths or site data. --format "
        "monai-bundle also takes a fine-tuned seg3d model (finetuned.safetensors).",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT",
                   help="the checkpoint's .safetensors or .json file (monai-bundle: also "
                   "a seg3d fine-tune's finetuned.safetensors)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--which", choices=("student", "teacher"), default="student",
                   help="network to export (default student: it was the better fine-tuning "
                   "start in docs/quality.md; the teacher is the EMA, re-measure after long runs)")
    p.add_argument("--model-config", type=Path, default=None, metavar="YAML",
                   help="model YAML, only for checkpoints whose sidecar records no model config")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors (default): model.safetensors + config.json for "
                   "fed_unimiss.load_pretrained; torchscript: also encoder.torchscript.pt, an "
                   "encoder plain PyTorch runs without this package (fixed input sizes, see "
                   "--input-size-2d/3d); monai-bundle: a MONAI bundle directory. Every format "
                   "writes the model card README.md")
    p.add_argument("--input-size-2d", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="torchscript: the 2D input size the file takes (default the "
                   "pretraining size)")
    p.add_argument("--input-size-3d", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="torchscript: the 3D input size the file takes (default the "
                   "pretraining size)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fed_unimiss.checkpoint import CheckpointError
    from fed_unimiss.config import ConfigError

    from .export import ExportError, export_checkpoint
    from .load import LoadError

    try:
        cfg = None
        if args.model_config is not None:
            from fed_unimiss.models import get_config

            cfg = get_config(args.model_config)
        if args.format == "monai-bundle":
            from .monai_bundle import export_bundle

            out = export_bundle(args.checkpoint, args.out, args.which, cfg)
            print(f"exported a MONAI bundle to {out}")
            return 0
        out = export_checkpoint(args.checkpoint, args.out, args.which, cfg)
        if args.format == "torchscript":
            from .export_torchscript import export_torchscript

            path = export_torchscript(out, args.input_size_2d, args.input_size_3d)
            print(f"wrote {path} (TorchScript encoder, runs without fed_unimiss)")
    except (CheckpointError, ConfigError, ExportError, LoadError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(f"exported {args.which} backbone to {out}")
    return 0
