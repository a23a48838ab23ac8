"""Resampling, tiling and resizing: the arrays UniMiSS trains on, made with torch only.

CT volumes are resampled to ``DataConfig.ct_spacing`` separably: first in-plane, then along the
slice axis, each with torch's antialiased bilinear interpolation (``antialias=True`` averages when
shrinking, so 0.3 mm pixels going to 1 mm do not alias; growing is plain bilinear). Slices are
processed in chunks so a 512^2 series never needs two full-resolution copies.

Tiles are ``ct_tile_depth`` consecutive slices starting every ``ct_tile_stride`` slices; when the
stride does not end exactly on the last slice, one more tile aligned to the end is added so no
slice is lost. A volume shorter than one tile is padded by edge replication, split evenly
between both ends (a short volume is still useful: views take 16 of the 24 slices).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resample_volume", "tile_volume", "resize_xray", "target_shape"]

_CHUNK = 32


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...],
                 target: tuple[float, ...]) -> tuple[int, ...]:
    """Voxel counts after resampling ``shape`` from ``spacing`` to ``target`` (at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True))


@torch.no_grad()
def resample_volume(volume: np.ndarray, spacing: tuple[float, float, float],
                    target: tuple[float, float, float]) -> np.ndarray:
    """Resample a (D, H, W) float32 volume from ``spacing`` to ``target`` mm (z, y, x)."""
    d, h, w = target_shape(volume.shape, spacing, target)
    src = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    planes = torch.empty((volume.shape[0], h, w), dtype=torch.float32)
    for start in range(0, volume.shape[0], _CHUNK):
        chunk = src[start:start + _CHUNK, None]
        planes[start:start + _CHUNK] = F.interpolate(
            chunk, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    flat = planes.reshape(1, 1, volume.shape[0], h * w)
    out = F.interpolate(flat, size=(d, h * w), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.reshape(d, h, w).numpy()


def tile_volume(volume: np.ndarray, depth: int, stride: int) -> list[np.ndarray]:
    """Cut (D, H, W) into (depth, H, W) tiles along axis 0 (see module docstring for the rule)."""
    n = volume.shape[0]
    if n < depth:
        before = (depth - n) // 2
        volume = np.pad(volume, ((before, depth - n - before), (0, 0), (0, 0)), mode="edge")
        n = depth
    starts = list(range(0, n - depth + 1, stride))
    if starts[-1] + depth < n:
        starts.append(n - depth)
    return [np.ascontiguousarray(volume[s:s + depth]) for s in starts]


@torch.no_grad()
def resize_xray(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) [0, 1] radiograph to (size, size), antialiased bilinear.

    The aspect ratio is not kept (the reference resizes chest films straight to 512^2; most are
    near-square). Output is clipped back to [0, 1].
    """
    src = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(src, size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0, 0].clamp_(0.0, 1.0).numpy()
