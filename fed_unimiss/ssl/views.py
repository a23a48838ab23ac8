"""The two global views per sample, for X-rays (2D) and CT tiles (3D), in plain torch ops.

Every random draw comes from a ``torch.Generator`` the caller seeds from (seed, global step, sample
position) with :func:`step_generator`, so step s always produces the same views: resuming a run,
or a federated round, reproduces training exactly. No OpenCV, no PIL: tensors in, tensors out.

2D (UniMiSS/DINO global crops): RandomResizedCrop(scale (0.14, 1), ratio (3/4, 4/3), bicubic),
horizontal flip 0.5, brightness/contrast jitter (0.4, 0.4) with p 0.8, Gaussian blur with
p 0.5 / 1.0 for view 0 / 1. X-rays are grey, so saturation/hue jitter and random greyscale are the
identity and are not computed. Output (3, crop, crop) in [0, 1] (grey repeated to 3 channels).

3D (UniMiSS): a shared in-plane region of side view_size x U(region_factor); per view
``view_depth`` consecutive slices, an in-plane crop of side view_size x U(crop_factor) inside the
region resized to view_size, a flip of each axis with ``flip_prob_3d``, then nnU-Net-style
intensity augmentations (Gaussian noise, in-plane blur, multiplicative and additive brightness,
contrast, gamma) drawn once per view ("volume") or per slice ("slice"). Output
(1, view_depth, view_size, view_size), unbounded (HU / hu_scale).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_unimiss.ssl.config import SSLConfig

__all__ = ["step_generator", "xray_views", "ct_views", "gaussian_blur2d"]

# X-ray colour jitter (DINO global views) and blur probabilities per view.
JITTER_PROB, BRIGHTNESS, CONTRAST = 0.8, 0.4, 0.4
BLUR_PROB_2D = (0.5, 1.0)
BLUR_SIGMA_2D = (0.1, 2.0)  # at a 224 crop; scaled with the crop side
# 3D intensity augmentations: (probability, parameter range), batchgenerators defaults.
NOISE_3D = (0.1, (0.0, 0.1))        # variance
BLUR_3D = (0.2, (0.5, 1.0))         # sigma in pixels
MUL_BRIGHT_3D = (0.15, (0.7, 1.3))  # factor
ADD_BRIGHT_3D = (0.15, 0.1)         # std of the additive shift
CONTRAST_3D = (0.15, (0.65, 1.5))   # factor, range preserved
GAMMA_3D = (0.15, (0.7, 1.5))       # exponent on the min-max normalised values


def step_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and any labels (kind, global step, sample position)."""
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    return torch.Generator().manual_seed(value)


def _uniform(gen: torch.Generator, lo: float, hi: float, n: int = 1) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _chance(gen: torch.Generator, p: float) -> bool:
    return bool(torch.rand(1, generator=gen).item() < p)


def _randint(gen: torch.Generator, low: int, high_inclusive: int) -> int:
    return int(torch.randint(low, high_inclusive + 1, (1,), generator=gen).item())


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur2d(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of the last two axes of ``x`` (N, H, W), reflect-padded."""
    k = _gaussian_kernel(sigma)
    r = k.numel() // 2
    n, h, w = x.shape
    y = x.reshape(n, 1, h, w)
    pad_mode = "reflect" if min(h, w) > r else "replicate"
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=pad_mode), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=pad_mode), k.view(1, 1, -1, 1))
    return y.reshape(n, h, w)


# ----------------------------------------------------------------------------------- 2D views
def _random_resized_crop_box(gen: torch.Generator, h: int, w: int,
                             scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop draws it."""
    area = h * w
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * float(_uniform(gen, *scale))
        ratio = math.exp(float(_uniform(gen, *log_ratio)))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return _randint(gen, 0, h - ch), _randint(gen, 0, w - cw), ch, cw
    side = min(h, w)  # fallback: the central square, as torchvision does for in-range ratios
    return (h - side) // 2, (w - side) // 2, side, side


def _xray_view(img: Tensor, gen: torch.Generator, crop: int, scale: tuple[float, float],
               blur_prob: float) -> Tensor:
    _, h, w = img.shape
    top, left, ch, cw = _random_resized_crop_box(gen, h, w, scale)
    patch = img[:, top:top + ch, left:left + cw].unsqueeze(0)  # (1, 1, ch, cw)
    x = F.interpolate(patch, size=(crop, crop), mode="bicubic", align_corners=False,
                      antialias=ch > crop or cw > crop)[0]  # (1, crop, crop)
    x = x.clamp(0.0, 1.0)
    if _chance(gen, 0.5):
        x = x.flip(-1)
    if _chance(gen, JITTER_PROB):
        b = float(_uniform(gen, 1 - BRIGHTNESS, 1 + BRIGHTNESS))
        c = float(_uniform(gen, 1 - CONTRAST, 1 + CONTRAST))
        ops = [lambda t: t * b, lambda t: t.mean() + (t - t.mean()) * c]
        if _chance(gen, 0.5):  # torchvision applies the jitter terms in random order
            ops.reverse()
        for op in ops:
            x = op(x).clamp(0.0, 1.0)
    if _chance(gen, blur_prob):
        sigma = float(_uniform(gen, *BLUR_SIGMA_2D)) * crop / 224.0
        x = gaussian_blur2d(x, max(sigma, 1e-3))
    return x.expand(3, crop, crop).contiguous()


def xray_views(img: Tensor, gen: torch.Generator, cfg: SSLConfig) -> list[Tensor]:
    """Two (3, crop_2d, crop_2d) views of one X-ray ``img`` of shape (1, S, S) in [0, 1]."""
    if img.ndim != 3 or img.shape[0] != 1:
        raise ValueError(f"an X-ray must have shape (1, H, W), got {tuple(img.shape)}")
    img = img.float()
    return [_xray_view(img, gen, cfg.crop_2d, cfg.crop_scale_2d, p) for p in BLUR_PROB_2D]


# ----------------------------------------------------------------------------------- 3D views
def _per_unit(gen: torch.Generator, n: int, p: float, lo: float, hi: float,
              neutral: float) -> Tensor | None:
    """Per-unit (view or slice) parameters: U(lo, hi) where a p-coin hits, ``neutral`` elsewhere."""
    hit = torch.rand(n, generator=gen) < p
    values = _uniform(gen, lo, hi, n)
    if not bool(hit.any()):
        return None
    return torch.where(hit, values, torch.full_like(values, neutral))


def _intensity_3d(x: Tensor, gen: torch.Generator, per_slice: bool) -> Tensor:
    """Noise, blur, brightness, contrast, gamma on ``x`` (D, H, W); one draw per view or slice."""
    d = x.shape[0]
    n = d if per_slice else 1
    shape = (n, 1, 1)
    dims = (1, 2) if per_slice else (0, 1, 2)

    var = _per_unit(gen, n, NOISE_3D[0], *NOISE_3D[1], neutral=0.0)
    if var is not None:
        x = x + torch.randn(x.shape, generator=gen) * var.sqrt().view(shape)
    sigma = _per_unit(gen, n, BLUR_3D[0], *BLUR_3D[1], neutral=0.0)
    if sigma is not None:
        sig = sigma.expand(d) if n == 1 else sigma
        x = torch.stack([gaussian_blur2d(x[i:i + 1], float(s))[0] if s > 0 else x[i]
                         for i, s in enumerate(sig.tolist())])
    mul = _per_unit(gen, n, MUL_BRIGHT_3D[0], *MUL_BRIGHT_3D[1], neutral=1.0)
    if mul is not None:
        x = x * mul.view(shape)
    hit = torch.rand(n, generator=gen) < ADD_BRIGHT_3D[0]
    shift = torch.randn(n, generator=gen) * ADD_BRIGHT_3D[1]
    if bool(hit.any()):
        x = x + torch.where(hit, shift, torch.zeros_like(shift)).view(shape)
    factor = _per_unit(gen, n, CONTRAST_3D[0], *CONTRAST_3D[1], neutral=1.0)
    if factor is not None:
        mean = x.mean(dim=dims, keepdim=True)
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        x = torch.maximum(torch.minimum(mean + (x - mean) * factor.view(shape), hi), lo)
    gamma = _per_unit(gen, n, GAMMA_3D[0], *GAMMA_3D[1], neutral=1.0)
    if gamma is not None:
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        span = (hi - lo).clamp_min(1e-7)
        x = ((x - lo) / span).clamp(0, 1).pow(gamma.view(shape)) * span + lo
    return x


def ct_views(tile: Tensor, gen: torch.Generator, cfg: SSLConfig) -> list[Tensor]:
    """Two (1, view_depth, view_size, view_size) views of one CT tile of shape (1, D, H, W)."""
    if tile.ndim != 4 or tile.shape[0] != 1:
        raise ValueError(f"a CT tile must have shape (1, D, H, W), got {tuple(tile.shape)}")
    _, depth, h, w = tile.shape
    vd, vs = cfg.view_depth, cfg.view_size
    if depth < vd:
        raise ValueError(f"a CT tile has {depth} slices, fewer than view_depth={vd}")
    tile = tile.float()
    region = min(int(round(vs * float(_uniform(gen, *cfg.region_factor)))), h, w)
    ry, rx = _randint(gen, 0, h - region), _randint(gen, 0, w - region)
    views = []
    for _ in range(2):
        z0 = _randint(gen, 0, depth - vd)
        side = min(int(round(vs * float(_uniform(gen, *cfg.crop_factor)))), region)
        cy, cx = ry + _randint(gen, 0, region - side), rx + _randint(gen, 0, region - side)
        sub = tile[:, z0:z0 + vd, cy:cy + side, cx:cx + side].unsqueeze(0)  # (1, 1, vd, s, s)
        x = F.interpolate(sub, size=(vd, vs, vs), mode="trilinear", align_corners=False)[0, 0]
        for axis in range(3):
            if _chance(gen, cfg.flip_prob_3d):
                x = x.flip(axis)
        x = _intensity_3d(x, gen, per_slice=cfg.intensity_mode == "slice")
        views.append(x.unsqueeze(0).contiguous())  # (1, vd, vs, vs)
    return views
