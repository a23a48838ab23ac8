"""The encoder as one TorchScript file: plain ``torch.jit.load`` runs it, without this package.

Researchers outside the consortium may not install fed-unimiss. TorchScript is the format that
a bare PyTorch loads and runs with no Python class definitions (``torch.export`` and ONNX would
need the same fixed-shape tracing here, and ONNX adds a runtime).

The MiT picks its 2D or 3D modules from the input's rank with Python control flow on shapes
(``getattr`` by suffix, positional-embedding resizing, padding of short axes), which TorchScript
cannot compile. So each path is *traced* once, at one input size per dimension, as two methods
of one traced module (``forward_2d``, ``forward_3d``) sharing every weight; a small scripted
``forward`` dispatches on the rank and refuses any other spatial size with an error naming the
traced one (a trace at one size silently computes nonsense at another). The batch size is free.

Output: the encoder's stage feature maps, fine to coarse, as ``forward_features`` gives them:
``[(B, embed_dims[i], *grid_i) for each stage]``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["TORCHSCRIPT_FILE", "export_torchscript", "traced_sizes"]

log = logging.getLogger(__name__)

TORCHSCRIPT_FILE = "encoder.torchscript.pt"


class _EncoderPaths(nn.Module):
    """The encoder's stage maps, as two methods to trace: one per input rank."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward_2d(self, x: Tensor) -> list[Tensor]:
        return self.encoder(x)[1]

    def forward_3d(self, x: Tensor) -> list[Tensor]:
        return self.encoder(x)[1]


class _Dispatch(nn.Module):
    """Scripted entry point: rank 4 -> the 2D trace, rank 5 -> the 3D trace, at their sizes."""

    def __init__(self, paths: torch.jit.ScriptModule, size_2d: list[int], size_3d: list[int],
                 chans_2d: int, chans_3d: int) -> None:
        super().__init__()
        self.paths = paths
        self.size_2d = size_2d
        self.size_3d = size_3d
        self.chans_2d = chans_2d
        self.chans_3d = chans_3d

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() == 4:
            self._check(x, "2D", self.chans_2d, self.size_2d)
            return self.paths.forward_2d(x)
        if x.dim() == 5:
            self._check(x, "3D", self.chans_3d, self.size_3d)
            return self.paths.forward_3d(x)
        raise ValueError("input must be (B, C, H, W) or (B, C, D, H, W); got shape "
                         + str(list(x.shape)))

    def _check(self, x: Tensor, kind: str, chans: int, size: list[int]) -> None:
        if x.shape[1] != chans or list(x.shape[2:]) != size:
            raise ValueError("this TorchScript encoder was traced for " + kind + " inputs (B, "
                             + str(chans) + ", " + str(size) + "); got shape "
                             + str(list(x.shape)))


def traced_sizes(model_config: dict, size_2d: Sequence[int] | None,
                 size_3d: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """The (H, W) and (D, H, W) to trace: the given ones, else the pretraining sizes."""
    s2 = list(size_2d) if size_2d else [int(model_config["img_size_2d"])] * 2
    s3 = list(size_3d) if size_3d else [int(s) for s in model_config["img_size_3d"]]
    if len(s2) != 2 or len(s3) != 3:
        raise ValueError(f"TorchScript sizes must be (H, W) and (D, H, W); got {s2} and {s3}")
    return s2, s3


def export_torchscript(model_dir: str | Path, size_2d: Sequence[int] | None = None,
                       size_3d: Sequence[int] | None = None) -> Path:
    """Write ``model_dir/encoder.torchscript.pt`` from an export directory; returns its path.

    The encoder is loaded with :func:`load_pretrained` (so the file computes what the module
    computes), traced at ``size_2d`` (H, W) and ``size_3d`` (D, H, W), default the pretraining
    sizes, and checked against the module on a random input of each size before it is kept.

    Raises:
        ValueError: a size the MiT cannot take (naming it) or a trace that does not reproduce
            the module.
    """
    from .load import load_pretrained, read_export_config

    model_dir = Path(model_dir)
    meta, cfg = read_export_config(model_dir)
    s2, s3 = traced_sizes(meta["model"], size_2d, size_3d)
    encoder = load_pretrained(model_dir, parts="encoder").eval()
    gen = torch.Generator().manual_seed(0)
    x2 = torch.rand(1, cfg.in_chans_2d, *s2, generator=gen)
    x3 = torch.randn(1, cfg.in_chans_3d, *s3, generator=gen) * 0.5
    for x in (x2, x3):
        encoder.check_input(x)  # a size the MiT cannot take fails here, with its reason
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every shape-dependent branch: that is why sizes are fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        paths = torch.jit.trace_module(_EncoderPaths(encoder.encoder),
                                       {"forward_2d": x2, "forward_3d": x3})
    scripted = torch.jit.script(_Dispatch(paths, s2, s3, cfg.in_chans_2d, cfg.in_chans_3d))
    with torch.no_grad():
        for x in (x2, x3):
            for a, b in zip(encoder.forward_features(x), scripted(x), strict=True):
                if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
                    raise ValueError(f"the traced encoder does not reproduce the module at "
                                     f"input {tuple(x.shape)}")
    path = model_dir / TORCHSCRIPT_FILE
    tmp = path.with_suffix(".tmp")
    torch.jit.save(scripted, str(tmp))
    tmp.replace(path)
    log.info("wrote %s (2D %s, 3D %s)", path, s2, s3)
    return path
