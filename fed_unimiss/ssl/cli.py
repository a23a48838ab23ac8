"""``fed-unimiss pretrain``: centralized self-distillation on one or more data folders."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fed_unimiss.privacy.config import PrivacyConfig

from fed_unimiss.cli.runtime_args import add_runtime_arguments, runtime_from_args

__all__ = ["register"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` subcommand (building the parser does no I/O)."""
    p = subparsers.add_parser(
        "pretrain", help="centralized / single-site self-distillation",
        description="Pretrain the UniMiSS MiT centrally on pooled data folders (the baseline the "
                    "federation is compared with, or a single-site run).")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="recipe YAML with model/data/ssl sections, e.g. configs/pretrain/micro.yaml "
                        "(micro for CPU smoke runs, tiny/small are the paper recipes)")
    p.add_argument("--data", required=True, action="append", metavar="DIR",
                   help="a folder of DICOM/NIfTI CT and X-rays; repeat to pool several sites")
    p.add_argument("--out", required=True, metavar="RUN",
                   help="run directory: checkpoints, metrics.jsonl, tb/ and the data cache")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="stop at global step N (the schedule still spans the recipe's epochs, so "
                        "a later --resume --steps M continues the same run)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in RUN")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    add_runtime_arguments(p, workers=True)
    dp = p.add_argument_group(
        "differential privacy", "patient-level DP-SGD for a single-site run (docs/privacy.md); "
        "the model section must have head_weight_norm: false and ssl.koleo_weight: 0")
    dp.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                    help="per-patient budget over the whole run; enables DP. Lower = more private "
                    "and noisier; single-digit values are typical")
    dp.add_argument("--dp-delta", type=float, default=None, metavar="D",
                    help="DP delta; keep it well below 1 / number of patients (default 1e-5)")
    dp.add_argument("--dp-clip", type=float, default=None, metavar="C",
                    help="per-patient gradient clip norm (default 1.0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fed_unimiss.checkpoint import CheckpointError
    from fed_unimiss.config import ConfigError
    from fed_unimiss.ssl.config import load_recipe
    from fed_unimiss.ssl.distributed import WorkerFailed
    from fed_unimiss.ssl.trainer import pretrain

    if args.steps is not None and args.steps < 0:
        print(f"error: --steps must be >= 0, got {args.steps}", file=sys.stderr)
        return 2
    try:
        runtime = runtime_from_args(args)
        recipe = load_recipe(args.config)
        privacy = _privacy(args)
        summary = pretrain(recipe, args.data, args.out, steps=args.steps, resume=args.resume,
                           progress=not args.no_progress and sys.stderr.isatty(),
                           privacy=privacy, runtime=runtime)
    except WorkerFailed as e:
        print(f"error: {e}; no checkpoint was written for the unfinished interval "
              f"(--resume continues from the last complete one)", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    interval = summary.get("interval_loss") or {}
    loss = (f"mean loss of steps {interval['from']}..{interval['to'] - 1}: "
            f"{interval['loss']:.4f}" if interval else "no step trained")
    print(f"pretrained steps {summary['start_step']}..{summary['end_step']} of "
          f"{summary['total_steps']}: {loss} (as the last checkpoint line), "
          f"{summary['samples_2d']} 2D / {summary['samples_3d']} 3D samples, "
          f"{summary['skipped']} skipped, on {summary['device']} in {summary['precision']} "
          f"x {summary['world_size']} process(es), checkpoints in {args.out}")
    if "epsilon" in summary:
        print(f"DP: epsilon spent so far {summary['epsilon']:.3f} per patient "
              f"(ledger in {args.out}/state)")
    if "refused" in summary:
        print(f"stopped: {summary['refused']}", file=sys.stderr)
        return 3
    return 0


def _privacy(args: argparse.Namespace) -> PrivacyConfig | None:
    """A PrivacyConfig from the --dp-* flags, or None when DP is not requested."""
    from fed_unimiss.privacy.config import PrivacyConfig, with_dp_settings

    if args.dp_epsilon is None:
        if args.dp_delta is not None or args.dp_clip is not None:
            raise ValueError("--dp-delta/--dp-clip need --dp-epsilon (which enables DP)")
        return None
    given = {"dp-epsilon": args.dp_epsilon, "dp-delta": args.dp_delta, "dp-clip": args.dp_clip}
    return with_dp_settings(PrivacyConfig(), {k: v for k, v in given.items() if v is not None},
                            "--dp-* flags", spell=lambda key: f"--{key}")
