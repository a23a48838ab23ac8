"""``--device``, ``--precision`` and ``--nproc``: the runtime flags shared by the training commands.

Kept free of torch imports so that building the parser (``--help``) stays instant.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fed_unimiss.runtime import Runtime

__all__ = ["add_runtime_arguments", "runtime_from_args"]

DEVICE_HELP = ("where to train: auto (the best available: CUDA, then Apple MPS, then CPU), cpu, "
               "cuda, cuda:N or mps (default auto)")
PRECISION_HELP = ("fp32 (default); bf16 or fp16 run the forward passes in that precision while "
                  "weights, optimiser, EMA teacher and center stay fp32 (bf16: recent CPUs and "
                  "GPUs; fp16: GPUs, with a gradient scaler)")


def add_runtime_arguments(p: argparse.ArgumentParser, *, workers: bool = False) -> None:
    g = p.add_argument_group("runtime", "where and how this machine computes (not part of the "
                             "recipe; docs/site-guide.md, 'Hardware')")
    g.add_argument("--device", default="auto", metavar="DEV", help=DEVICE_HELP)
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help=PRECISION_HELP)
    if workers:
        g.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="data-parallel processes training one model (gloo on CPU, nccl on "
                            "CUDA; one GPU each). The recipe's batch is the global batch; "
                            "ssl.accumulate cuts it further (default 1)")


def runtime_from_args(args: argparse.Namespace) -> Runtime:
    """The validated Runtime of the flags; ``ValueError`` names the flag that is wrong."""
    from fed_unimiss.runtime import Runtime

    runtime = Runtime(device=args.device, precision=args.precision,
                      workers=getattr(args, "nproc", 1))
    try:
        runtime.validate()
    except ValueError as e:
        flag = "--nproc" if str(e).startswith("workers") else (
            "--precision" if str(e).startswith("precision") else "--device")
        raise ValueError(f"{flag}: {e}") from None
    return runtime
