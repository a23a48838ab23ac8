"""MiT: the UniMiSS encoder-decoder Transformer with a switchable 2D/3D patch embedding.

Xie et al., "UniMiSS: Universal Medical Self-Supervised Learning via Breaking Dimensionality
Barrier", ECCV 2022; reference code YtongXie/UniMiSS-code (Apache-2.0), read for facts only.

One network takes a 2D image (B, 3, H, W) or a 3D volume (B, 1, D, H, W). The input's rank picks
the dimension-specific modules (stem, patch embeddings, positional embeddings, spatial-reduction
convs, decoder up-convolutions); they turn the input into token sequences, and every Transformer
weight after that is shared between 2D and 3D. Every dimension-specific module is named with a
``_2d``/``_3d`` suffix: that naming *is* the contract :mod:`fed_unimiss.models.classify` reads.

Deliberate differences from the reference (same parameters, same results at its sizes):
- positional embeddings are resized to any 2D size and any 3D depth and size (the reference 3D
  resize only works at the pretraining depth);
- sizes that do not divide evenly are handled: convs with padding round up (ceil), decoder
  up-convolutions are cropped to the skip's grid, and a spatial-reduction conv whose kernel is
  larger than the token grid along an axis sees that axis replicate-padded to the kernel size;
- attention runs through ``F.scaled_dot_product_attention``; activations are not in-place and
  every token-to-map reshape that feeds a conv is made contiguous (Opacus-friendly);
- speed, same function up to float rounding (tests/models pin each against the plain
  computation): the 3D spatial-reduction conv runs as one matmul on its non-overlapping blocks,
  and ``forward`` (which returns only the decoder CLS) runs the decoder's last block for the
  CLS row alone; ``forward_intermediates`` still computes every map;
- stochastic depth and dropout are gone (the reference's 0.1 never reached the blocks).

Minimum input size: InstanceNorm needs more than one position, so the grid after the last patch
embedding must hold >= 2 tokens, i.e. ceil(H/32)*ceil(W/32) >= 2 in 2D (e.g. 64x32) and
ceil(D/16)*ceil(H/32)*ceil(W/32) >= 2 in 3D for four stages (e.g. 8x64x64 or 16x96x96).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model_config import ModelConfig

__all__ = [
    "ConvBlock",
    "Mlp",
    "Attention",
    "Block",
    "PosEmbed",
    "ClsToken",
    "MiTEncoder",
    "MiTDecoder",
    "MiTFeatures",
    "MiT",
    "init_weights",
]

Grid = tuple[int, ...]


def _suffix(spatial_dims: int) -> str:
    return "2d" if spatial_dims == 2 else "3d"


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _to_map(tokens: Tensor, grid: Grid) -> Tensor:
    """(B, N, C) patch tokens -> contiguous (B, C, *grid) feature map."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, *grid).contiguous()  # (B, C, *grid)


def _blocks(fmap: Tensor, size: int) -> Tensor:
    """(B, C, *grid) -> (B, M, C * size^k): the non-overlapping size^k blocks a conv with
    kernel = stride = ``size`` sees (trailing remainders dropped, as the conv floors), each
    flattened in the conv weight's (C, *kernel) order; M blocks in row-major grid order."""
    b, c, *grid = fmap.shape
    out = [g // size for g in grid]
    fmap = fmap[(slice(None), slice(None), *(slice(0, o * size) for o in out))]
    split = [d for o in out for d in (o, size)]  # (B, C, o0, s, o1, s, ...)
    k = len(grid)
    order = (0, *range(2, 2 + 2 * k, 2), 1, *range(3, 3 + 2 * k, 2))  # (B, o..., C, s...)
    return fmap.reshape(b, c, *split).permute(order).reshape(b, math.prod(out), -1)


def _to_tokens(fmap: Tensor) -> Tensor:
    """(B, C, *grid) feature map -> (B, N, C) tokens."""
    return fmap.flatten(2).transpose(1, 2)  # (B, N, C)


# ---------------------------------------------------------------------------------------------
# Blocks, small to large
# ---------------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """Conv (no bias) -> InstanceNorm (affine) -> LeakyReLU(0.01), in 2D or 3D (the SPE unit)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        spatial_dims: int,
        kernel_size: int,
        stride: int | tuple[int, ...],
        padding: int,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        self.conv = conv(in_chans, out_chans, kernel_size, stride, padding, bias=False)
        self.norm = norm(out_chans, affine=True)
        self.act = nn.LeakyReLU(0.01)  # not in-place: Opacus hooks keep activations

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class Mlp(nn.Module):
    """Linear - GELU - Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Spatial-reduction attention (PVT-v1) with a CLS token that is never reduced.

    Keys and values come from the patch tokens reduced by a conv with kernel = stride = sr (a
    Conv2d for 2D inputs, a Conv3d for 3D: separate weights, named ``sr_2d``/``sr_3d``), with
    the CLS token put back in front, then a LayerNorm. Queries keep full resolution.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr_2d = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_3d = nn.Conv3d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # torch default eps, as in the reference

    def _reduce(self, patches: Tensor, grid: Grid) -> Tensor:
        """(B, N, C) patch tokens on ``grid`` -> (B, M, C) reduced tokens.

        Kernel = stride = sr and no padding: the conv is a linear map of non-overlapping
        sr^k blocks. In 3D that map runs as one matmul on the gathered blocks (about twice as
        fast as the Conv3d forward + backward at these sizes, equal up to float rounding; tests
        pin it to F.conv3d). In 2D the Conv2d is as fast, and it runs on a contiguous copy:
        Opacus' conv per-sample gradients are wrong on a channels-last view of the tokens.
        """
        fmap = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)
        # An axis shorter than the kernel is replicate-padded up to it (e.g. depth 1 with sr 2);
        # longer axes are floored by the conv exactly as in the reference.
        short = [max(self.sr_ratio - g, 0) for g in grid]
        if any(short):
            pad: list[int] = []
            for extra in reversed(short):  # F.pad lists the last axis first
                pad += [0, extra]
            fmap = F.pad(fmap, pad, mode="replicate")
        if len(grid) == 2:
            return _to_tokens(self.sr_2d(fmap.contiguous()))  # (B, M, C)
        conv = self.sr_3d
        blocks = _blocks(fmap, self.sr_ratio)  # (B, M, C * sr^3)
        return F.linear(blocks, conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def forward(self, x: Tensor, grid: Grid, queries: int | None = None) -> Tensor:
        """x (B, 1+N, C) on ``grid`` -> (B, 1+N, C); with ``queries=k`` only the first k rows
        (keys and values still come from all of ``x``)."""
        b, _, c = x.shape
        h = self.num_heads
        xq = x if queries is None else x[:, :queries]
        n = xq.shape[1]
        q = self.q(xq).reshape(b, n, h, c // h).transpose(1, 2)  # (B, h, n, hd)
        if self.sr_ratio > 1:
            kv_in = self.norm(torch.cat([x[:, :1], self._reduce(x[:, 1:], grid)], dim=1))
        else:
            kv_in = x
        kv = self.kv(kv_in).reshape(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)  # (2,B,h,M,hd)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, h, N, hd), scale hd^-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN x), then x + MLP(LN x)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, sr_ratio: int, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, grid: Grid, cls_only: bool = False) -> Tensor:
        """(B, 1+N, C) -> (B, 1+N, C), or with ``cls_only`` just the CLS row (B, 1, C).

        Every row's output depends on the other rows only through the keys and values, so the
        CLS row alone needs the attention's query, projection and MLP for one row: the exact
        computation of that row, for a caller that reads nothing else.
        """
        if not cls_only:
            x = x + self.attn(self.norm1(x), grid)
            return x + self.mlp(self.norm2(x))
        x = x[:, :1] + self.attn(self.norm1(x), grid, queries=1)  # (B, 1, C)
        return x + self.mlp(self.norm2(x))


class PosEmbed(nn.Module):
    """Learnable absolute positional embedding with a CLS slot, resized to any grid.

    Stored as ``weight`` (1, 1 + prod(grid), dim) for the pretraining grid, as in the reference.
    ``forward`` takes the stage's feature map and returns its tokens with the positions added,
    led by the CLS slot's embedding (the caller adds the CLS token to it). Taking one batched
    tensor and holding one direct parameter makes it a leaf layer Opacus' per-sample-gradient
    fallback (torch.func) can handle; the grid travels in the map's shape.
    """

    def __init__(self, dim: int, grid: Grid) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.weight = nn.Parameter(torch.zeros(1, 1 + math.prod(self.grid), dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def resized(self, grid: Grid) -> Tensor:
        """Embedding for ``grid``: (1, 1 + prod(grid), dim); bicubic in 2D, trilinear in 3D.

        Interpolates to the target size per axis, so any 2D size and any 3D depth works.
        """
        grid = tuple(grid)
        if grid == self.grid:
            return self.weight
        if len(grid) != len(self.grid):
            raise ValueError(f"PosEmbed stored for a {len(self.grid)}D grid, asked for {grid}")
        cls, patches = self.weight[:, :1], self.weight[:, 1:]
        fmap = _to_map(patches, self.grid)  # (1, dim, *stored grid)
        mode = "bicubic" if len(grid) == 2 else "trilinear"
        fmap = F.interpolate(fmap, size=grid, mode=mode, align_corners=False)  # (1, dim, *grid)
        return torch.cat([cls, _to_tokens(fmap)], dim=1)

    def forward(self, fmap: Tensor) -> Tensor:
        """(B, dim, *grid) map -> (B, 1 + N, dim): [CLS-slot embedding, patch tokens + pos]."""
        pos = self.resized(tuple(fmap.shape[2:]))  # (1, 1+N, dim)
        cls_pos = pos[:, :1].expand(fmap.shape[0], -1, -1)  # (B, 1, dim)
        return torch.cat([cls_pos, _to_tokens(fmap) + pos[:, 1:]], dim=1)


class ClsToken(nn.Module):
    """The learnable CLS token (1, 1, dim) entering encoder stage 1 (a leaf module).

    ``forward(x)`` takes any batched tensor and returns the token per sample (B, dim), so
    per-sample-gradient tools see a batch input.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight[:, 0].expand(x.shape[0], -1)  # (B, dim)


def _with_cls(pos_tokens: Tensor, cls: Tensor) -> Tensor:
    """Add the CLS token (B, C) to the CLS slot of the position-embedded tokens (B, 1+N, C)."""
    return torch.cat([pos_tokens[:, :1] + cls.unsqueeze(1), pos_tokens[:, 1:]], dim=1)


def _stages(dims, heads, depths, srs, mlp_ratio, qkv_bias, eps) -> nn.ModuleList:
    return nn.ModuleList(
        nn.ModuleList(Block(d, h, mlp_ratio, qkv_bias, sr, eps) for _ in range(n))
        for d, h, n, sr in zip(dims, heads, depths, srs, strict=True)
    )


def encoder_grids(cfg: ModelConfig, spatial_dims: int, size: Grid) -> list[Grid]:
    """Token grid of every encoder stage for an input of spatial ``size``.

    Stem: k7, stride 2 (2D) or (1, 2, 2) (3D), pad 3; each patch embedding: k3, stride 2, pad 1.
    Both round up, so 16x96x96 -> 8x24x24, 4x12x12, 2x6x6, 1x3x3 and 224^2 -> 56, 28, 14, 7.
    """
    stem_strides = (2, 2) if spatial_dims == 2 else (1, 2, 2)
    g = tuple(_conv_out(s, 7, st, 3) for s, st in zip(size, stem_strides, strict=True))
    grids = []
    for _ in cfg.embed_dims:
        g = tuple(_conv_out(s, 3, 2, 1) for s in g)
        grids.append(g)
    return grids


# ---------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------
@dataclass
class MiTFeatures:
    """Everything the backbone computes for one batch; shapes for B samples.

    ``encoder_maps[i]`` (B, embed_dims[i], *grid_i) and ``encoder_cls[i]`` (B, embed_dims[i])
    are the patch tokens (as a map) and CLS token after encoder stage i. ``decoder_maps[j]``
    (B, decoder_dims[j], *grid) is decoder stage j, coarse to fine; the last one (and
    ``decoder_cls``, the pretraining output) is after the final LayerNorm.
    """

    stem: Tensor
    encoder_maps: list[Tensor]
    encoder_cls: list[Tensor]
    decoder_maps: list[Tensor]
    decoder_cls: Tensor | None


class MiTEncoder(nn.Module):
    """Stem + four (patch embedding, positional embedding, Transformer stage) steps."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dims = cfg.embed_dims
        chans = (cfg.stem_dim, *dims[:-1])
        self.stem_2d = ConvBlock(cfg.in_chans_2d, cfg.stem_dim, 2, 7, 2, 3)
        self.stem_3d = ConvBlock(cfg.in_chans_3d, cfg.stem_dim, 3, 7, (1, 2, 2), 3)
        self.patch_embed_2d = nn.ModuleList(
            ConvBlock(i, o, 2, 3, 2, 1) for i, o in zip(chans, dims, strict=True)
        )
        self.patch_embed_3d = nn.ModuleList(
            ConvBlock(i, o, 3, 3, 2, 1) for i, o in zip(chans, dims, strict=True)
        )
        grids_2d = encoder_grids(cfg, 2, (cfg.img_size_2d, cfg.img_size_2d))
        grids_3d = encoder_grids(cfg, 3, tuple(cfg.img_size_3d))
        self.pos_embed_2d = nn.ModuleList(
            PosEmbed(d, g) for d, g in zip(dims, grids_2d, strict=True)
        )
        self.pos_embed_3d = nn.ModuleList(
            PosEmbed(d, g) for d, g in zip(dims, grids_3d, strict=True)
        )
        self.cls_token = ClsToken(dims[0])
        # The CLS token is re-projected to the next stage's width between stages.
        self.cls_proj = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.stages = _stages(
            dims,
            cfg.num_heads,
            cfg.depths,
            cfg.sr_ratios,
            cfg.mlp_ratio,
            cfg.qkv_bias,
            cfg.norm_eps,
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """x (B, C, *size) -> (stem map, per-stage maps, per-stage CLS tokens)."""
        sfx = _suffix(x.ndim - 2)
        stem: Tensor = getattr(self, f"stem_{sfx}")(x)  # (B, stem_dim, *grid0)
        patch_embeds = getattr(self, f"patch_embed_{sfx}")
        pos_embeds = getattr(self, f"pos_embed_{sfx}")
        maps, cls_tokens = [], []
        # The token needs only the batch size; a detached input makes backward hooks (Opacus)
        # fire on the token's own gradient, since its output does not depend on the input.
        fmap, cls = stem, self.cls_token(x.detach())  # cls: (B, dims[0])
        for i, blocks in enumerate(self.stages):
            fmap = patch_embeds[i](fmap)  # (B, C_i, *grid_i)
            grid = tuple(fmap.shape[2:])
            if i > 0:
                cls = self.cls_proj[i - 1](cls)  # (B, C_i)
            tokens = _with_cls(pos_embeds[i](fmap), cls)  # (B, 1+N, C_i)
            for blk in blocks:
                tokens = blk(tokens, grid)
            cls, fmap = tokens[:, 0], _to_map(tokens[:, 1:], grid)
            maps.append(fmap)
            cls_tokens.append(cls)
        return stem, maps, cls_tokens


class MiTDecoder(nn.Module):
    """U-like decoder: per stage, ConvTranspose(k2, s2) up-sampling, add the encoder skip,
    prepend the projected CLS, add the stage's positional embedding, Transformer blocks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dims = cfg.decoder_dims
        ins = (cfg.embed_dims[-1], *dims[:-1])
        self.up_2d = nn.ModuleList(
            nn.ConvTranspose2d(i, o, 2, 2) for i, o in zip(ins, dims, strict=True)
        )
        self.up_3d = nn.ModuleList(
            nn.ConvTranspose3d(i, o, 2, 2) for i, o in zip(ins, dims, strict=True)
        )
        # Decoder stage j works on the grid of encoder stage n-2-j.
        skips = list(reversed(range(len(cfg.embed_dims) - 1)))
        grids_2d = encoder_grids(cfg, 2, (cfg.img_size_2d, cfg.img_size_2d))
        grids_3d = encoder_grids(cfg, 3, tuple(cfg.img_size_3d))
        self.pos_embed_2d = nn.ModuleList(
            PosEmbed(d, grids_2d[s]) for d, s in zip(dims, skips, strict=True)
        )
        self.pos_embed_3d = nn.ModuleList(
            PosEmbed(d, grids_3d[s]) for d, s in zip(dims, skips, strict=True)
        )
        self.cls_proj = nn.ModuleList(nn.Linear(i, o) for i, o in zip(ins, dims, strict=True))
        self.stages = _stages(
            dims,
            cfg.decoder_heads,
            cfg.decoder_depths,
            cfg.decoder_sr_ratios,
            cfg.mlp_ratio,
            cfg.decoder_qkv_bias,
            cfg.decoder_norm_eps,
        )
        self.norm = nn.LayerNorm(dims[-1], eps=cfg.decoder_norm_eps)

    def forward(
        self, encoder_maps: list[Tensor], encoder_cls: list[Tensor], cls_only: bool = False
    ) -> tuple[list[Tensor], Tensor]:
        """Encoder outputs -> (decoder maps coarse to fine, final normed CLS (B, dims[-1])).

        ``cls_only``: the caller reads only the CLS (pretraining); the last block of the last
        stage then computes the CLS row alone and no map of that stage is returned.
        """
        sfx = _suffix(encoder_maps[0].ndim - 2)
        ups = getattr(self, f"up_{sfx}")
        pos_embeds = getattr(self, f"pos_embed_{sfx}")
        fmap, cls = encoder_maps[-1], encoder_cls[-1]
        maps = []
        last = len(self.stages) - 1
        for j, blocks in enumerate(self.stages):
            skip = encoder_maps[-2 - j]  # (B, C_j, *grid_j)
            grid = tuple(skip.shape[2:])
            up = ups[j](fmap)  # (B, C_j, *2 x coarser grid) >= grid: crop odd sizes
            up = up[(slice(None), slice(None), *(slice(0, g) for g in grid))]
            tokens = _with_cls(pos_embeds[j](up + skip), self.cls_proj[j](cls))  # (B, 1+N, C_j)
            for k, blk in enumerate(blocks):
                tokens = blk(tokens, grid, cls_only=cls_only and j == last and k == len(blocks) - 1)
            if j == last:
                tokens = self.norm(tokens)
                if cls_only:
                    return maps, tokens[:, 0]
            cls, fmap = tokens[:, 0], _to_map(tokens[:, 1:], grid)
            maps.append(fmap)
        return maps, cls


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------
def init_weights(module: nn.Module) -> None:
    """Reference initialisation: Linear trunc-normal(0.02) + zero bias, Conv2d/3d Kaiming
    fan-out, norms weight 1 bias 0. Transposed convs and conv biases keep torch's defaults
    (the reference's ``isinstance`` checks do not reach them)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
    elif isinstance(module, (nn.LayerNorm, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MiT(nn.Module):
    """Encoder + decoder. ``forward(x)`` -> the decoder CLS embedding (B, decoder_dims[-1]).

    ``x`` is (B, in_chans_2d, H, W) or (B, in_chans_3d, D, H, W); anything else is a
    ``ValueError`` naming the shape. Fine-tuning code uses :meth:`forward_features` (encoder
    only), :meth:`forward_intermediates` and :attr:`feature_info` instead of internals.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.num_features = cfg.out_dim
        self.encoder = MiTEncoder(cfg)
        self.decoder = MiTDecoder(cfg)
        self.apply(init_weights)
        self.feature_info = self._feature_info(cfg)

    @staticmethod
    def _feature_info(cfg: ModelConfig) -> list[dict[str, Any]]:
        """Channels and reduction of every stage output (timm-style ``feature_info``).

        ``reduction`` is the 2D stride; ``reduction_3d`` the (D, H, W) stride of the 3D path.
        """
        info = []
        for i, d in enumerate(cfg.embed_dims):
            r = 2 ** (i + 2)
            info.append(
                {
                    "module": f"encoder.stages.{i}",
                    "num_chs": d,
                    "reduction": r,
                    "reduction_3d": (r // 2, r, r),
                }
            )
        for j, d in enumerate(cfg.decoder_dims):
            r = info[len(cfg.embed_dims) - 2 - j]["reduction"]
            info.append(
                {
                    "module": f"decoder.stages.{j}",
                    "num_chs": d,
                    "reduction": r,
                    "reduction_3d": (r // 2, r, r),
                }
            )
        return info

    @property
    def num_layers(self) -> int:
        """Depth levels of :meth:`layer_of`: the stems, every encoder stage, every decoder
        stage, the decoder norm."""
        return len(self.config.embed_dims) + len(self.config.decoder_dims) + 2

    def layer_of(self, name: str) -> int:
        """The depth of parameter ``name`` (as ``named_parameters`` spells it) counted from
        the input, for layer-wise learning-rate decay (BEiT): 0 the stems; 1..n the encoder
        stages, each with the patch embedding, positional embedding and CLS projection that
        feed it; then the decoder stages with their up-sampling; last the decoder norm.

        Raises ``ValueError`` for a name that is not one of this model's parameters.
        """
        parts = name.split(".")
        n_enc = len(self.config.embed_dims)
        try:
            if parts[0] == "encoder":
                if parts[1] in ("stem_2d", "stem_3d"):
                    return 0
                if parts[1] == "cls_token":
                    return 1
                index = int(parts[2])
                # cls_proj[i] takes the token from stage i + 1 to stage i + 2
                return index + (2 if parts[1] == "cls_proj" else 1)
            if parts[0] == "decoder":
                if parts[1] == "norm":
                    return self.num_layers - 1
                return 1 + n_enc + int(parts[2])
        except (IndexError, ValueError):
            pass
        raise ValueError(f"{name!r} is not a parameter name of this MiT")

    def check_input(self, x: Tensor) -> int:
        """Validate ``x`` and return its spatial rank (2 or 3); raises ``ValueError``/``TypeError``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"MiT input must be a torch.Tensor, got {type(x).__name__}")
        cfg = self.config
        if x.ndim == 4:
            spatial_dims, chans, layout = 2, cfg.in_chans_2d, "(B, C, H, W)"
        elif x.ndim == 5:
            spatial_dims, chans, layout = 3, cfg.in_chans_3d, "(B, C, D, H, W)"
        else:
            raise ValueError(
                f"MiT input must be (B, {cfg.in_chans_2d}, H, W) for 2D or "
                f"(B, {cfg.in_chans_3d}, D, H, W) for 3D; got shape {tuple(x.shape)}"
            )
        if x.shape[1] != chans:
            raise ValueError(
                f"MiT {spatial_dims}D input {layout} must have C = {chans} channels, got shape "
                f"{tuple(x.shape)}" + (" (repeat grey X-rays to 3 channels)" if chans == 3 else "")
            )
        if not x.is_floating_point():
            raise TypeError(f"MiT input must be a floating-point tensor, got {x.dtype}")
        last = encoder_grids(cfg, spatial_dims, tuple(x.shape[2:]))[-1]
        if math.prod(last) < 2:
            raise ValueError(
                f"MiT input of spatial size {tuple(x.shape[2:])} is too small: the last patch "
                f"embedding would see a {last} grid and InstanceNorm needs >= 2 positions "
                "(2D: ceil(H/32)*ceil(W/32) >= 2; 3D: ceil(D/16)*ceil(H/32)*ceil(W/32) >= 2)"
            )
        return spatial_dims

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Encoder only: the stage feature maps [(B, embed_dims[i], *grid_i)], fine to coarse."""
        self.check_input(x)
        return self.encoder(x)[1]

    def forward_intermediates(self, x: Tensor, decoder: bool = True) -> MiTFeatures:
        """Encoder (and, unless ``decoder=False``, decoder) outputs of every stage."""
        self.check_input(x)
        stem, maps, cls_tokens = self.encoder(x)
        if not decoder:
            return MiTFeatures(stem, maps, cls_tokens, [], None)
        dec_maps, dec_cls = self.decoder(maps, cls_tokens)
        return MiTFeatures(stem, maps, cls_tokens, dec_maps, dec_cls)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        _, maps, cls_tokens = self.encoder(x)
        return self.decoder(maps, cls_tokens, cls_only=True)[1]  # (B, decoder_dims[-1])
