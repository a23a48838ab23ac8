"""Segmentation network on the pretrained MiT: encoder + U-like decoder + a final up-stage.

Follows the UniMiSS BCV downstream model (YtongXie/UniMiSS-code, ``Downstream/BCV``; read for
facts only): the pretrained decoder ends at the stride of encoder stage 1 (4 in 2D, (2, 4, 4) in
3D), so one more stage is added - a transposed conv (k2, s2) to the stem's width and grid, plus
the stem map as a skip, then a conv block - and the logits are up-sampled by the stem's stride
to the input size. Deep supervision puts a 1x1 conv on every decoder stage and on the new
stage; during training all of them are returned (fine to coarse) for
:class:`fed_unimiss.finetune.losses.DeepSupervisionLoss`, in eval only the full-size logits.

The same class serves 2D (``spatial_dims=2``: X-rays or CT slices, 3 channels) and 3D
(``spatial_dims=3``: CT volumes, 1 channel); only the modules of the chosen path are created.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fed_unimiss.models.mit import ConvBlock, MiT

__all__ = ["SegmentationNet"]


class SegmentationNet(nn.Module):
    """``backbone`` (a pretrained or fresh :class:`~fed_unimiss.models.MiT`) + segmentation head.

    ``forward(x)`` -> logits (B, num_classes, *x.spatial) in eval mode; in training with deep
    supervision a list ``[full, stem-level, decoder stage -1, ..., decoder stage 0]``.
    """

    def __init__(
        self, backbone: MiT, num_classes: int, spatial_dims: int, deep_supervision: bool = True
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + 1 class), got {num_classes}")
        cfg = backbone.config
        self.backbone = backbone
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        up = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        # The stem stride: 2 in 2D, (1, 2, 2) in 3D (depth is not halved by the stem).
        self.stem_stride = (2, 2) if spatial_dims == 2 else (1, 2, 2)
        self.up_final = up(cfg.decoder_dims[-1], cfg.stem_dim, kernel_size=2, stride=2)
        self.refine = ConvBlock(cfg.stem_dim, cfg.stem_dim, spatial_dims, 3, 1, 1)
        self.ds_heads = nn.ModuleList(conv(d, num_classes, 1) for d in cfg.decoder_dims)
        self.ds_stem = conv(cfg.stem_dim, num_classes, 1)
        self.cls_conv = conv(cfg.stem_dim, num_classes, 1)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that are not part of the backbone (trained even in linear mode)."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.backbone.check_input(x) != self.spatial_dims:
            raise ValueError(
                f"this segmentation model is {self.spatial_dims}D; got input shape {tuple(x.shape)}"
            )
        feats = self.backbone.forward_intermediates(x)
        stem = feats.stem  # (B, stem_dim, *grid0)
        fmap = self.up_final(feats.decoder_maps[-1])  # (B, stem_dim, >= grid0)
        fmap = fmap[(slice(None), slice(None), *(slice(0, g) for g in stem.shape[2:]))]
        fmap = self.refine(fmap + stem)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        up = F.interpolate(fmap, scale_factor=self.stem_stride, mode=mode, align_corners=False)
        logits = self.cls_conv(up)
        logits = _fit(logits, x.shape[2:])  # (B, K, *input spatial)
        if not (self.training and self.deep_supervision):
            return logits
        coarse = [head(m) for head, m in zip(self.ds_heads, feats.decoder_maps, strict=False)]
        return [logits, self.ds_stem(fmap), *reversed(coarse)]


def _fit(t: Tensor, size) -> Tensor:
    """Crop (or replicate-pad) the spatial dims of ``t`` to ``size`` (odd input sizes)."""
    size = tuple(int(s) for s in size)
    t = t[(slice(None), slice(None), *(slice(0, s) for s in size))]
    short = [s - have for s, have in zip(size, t.shape[2:], strict=False)]
    if any(short):
        pad: list[int] = []
        for extra in reversed(short):
            pad += [0, extra]
        t = F.pad(t, pad, mode="replicate")
    return t
