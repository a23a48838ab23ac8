"""Segmentation network on the pretrained MiT: encoder + U-like decoder + a final up-stage.

Follows the UniMiSS BCV downstream model (YtongXie/UniMiSS-code, ``Downstream/BCV``; read for
facts only): the pretrained decoder ends at the stride of encoder stage 1 (4 in 2D, (2, 4, 4) in
3D), so one more stage is added - a transposed conv (k2, s2) to the stem's width and grid, plus
the stem map as a skip, then a conv block. Unlike the reference, which interpolates the logits by
the stem's stride, a last learned stage brings the features to full resolution with a conv stage
on the raw input as its skip (as UNETR does): small organs need full-resolution features. Deep supervision puts a 1x1 conv on every decoder stage and on the new
stage; during training all of them are returned (fine to coarse) for
:class:`fed_unimiss.finetune.losses.SegmentationLoss`, in eval only the full-size logits.

The same class serves 2D (``spatial_dims=2``: X-rays or CT slices, 3 channels) and 3D
(``spatial_dims=3``: CT volumes, 1 channel); only the modules of the chosen path are created.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_unimiss.models.mit import MiT

__all__ = ["SegmentationNet"]



def _res_unit(spatial_dims: int, in_chans: int, out_chans: int) -> nn.Module:
    """MONAI's residual conv unit (3x3, stride 1, instance norm).

    monai is imported here, not at the top: its package import takes ~1.7 s, which every
    command that merely imports the fine-tuning package would otherwise pay.
    """
    from monai.networks.blocks import UnetResBlock

    return UnetResBlock(spatial_dims, in_chans, out_chans, 3, 1, "instance")

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
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        # The stem stride: 2 in 2D, (1, 2, 2) in 3D (depth is not halved by the stem).
        self.stem_stride = (2, 2) if spatial_dims == 2 else (1, 2, 2)
        in_chans = cfg.in_chans_2d if spatial_dims == 2 else cfg.in_chans_3d
        width = cfg.stem_dim
        # The decoder's finest map (stride of encoder stage 1) up to the stem's grid, with the
        # stem map (through a residual conv unit) as its skip.
        self.stem_skip = _res_unit(spatial_dims, width, width)
        self.up_stem = UpBlock(spatial_dims, cfg.decoder_dims[-1], width, 2)
        # Full resolution: the pretrained backbone's finest map is at the stem's stride, which
        # loses thin and small structures. A residual conv unit on the raw input (UNETR's
        # "encoder1") is the skip of one more learned up-sampling, so the logits come from
        # full-resolution features instead of an interpolation.
        self.input_skip = _res_unit(spatial_dims, in_chans, width)
        self.up_full = UpBlock(spatial_dims, width, width, self.stem_stride)
        self.ds_heads = nn.ModuleList(conv(d, num_classes, 1) for d in cfg.decoder_dims)
        self.ds_stem = conv(width, num_classes, 1)
        self.cls_conv = conv(width, num_classes, 1)

    @property
    def num_outputs(self) -> int:
        """How many logit maps ``forward`` returns in training (1 without deep supervision)."""
        return 2 + len(self.ds_heads) if self.deep_supervision else 1

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
        stem = self.stem_skip(feats.stem)  # (B, width, *grid0)
        fmap = self.up_stem(feats.decoder_maps[-1], stem)  # (B, width, *grid0)
        logits = self.cls_conv(self.up_full(fmap, self.input_skip(x)))  # (B, K, *x.spatial)
        if not (self.training and self.deep_supervision):
            return logits
        coarse = [head(m) for head, m in zip(self.ds_heads, feats.decoder_maps, strict=False)]
        return [logits, self.ds_stem(fmap), *reversed(coarse)]


class UpBlock(nn.Module):
    """Transposed conv (kernel = stride) up to the skip's grid, concatenate, residual conv unit.

    MONAI's ``UnetrUpBlock`` without its assumption that sizes divide: the encoder rounds odd
    sizes up, so the up-sampled map can overshoot its skip by one and is cropped to it.
    """

    def __init__(self, spatial_dims: int, in_chans: int, out_chans: int, stride) -> None:
        super().__init__()
        up = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.up = up(in_chans, out_chans, kernel_size=stride, stride=stride)
        self.conv = _res_unit(spatial_dims, 2 * out_chans, out_chans)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = _fit(self.up(x), skip.shape[2:])  # (B, out, *skip grid)
        return self.conv(torch.cat([up, skip], dim=1))


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
