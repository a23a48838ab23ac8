"""Sliding-window inference over whole volumes (or whole 2D images).

Training sees fixed-size patches; validation must cover whole volumes of any size. The window
slides with a given overlap, every window's class probabilities are weighted by a Gaussian that
trusts the window centre more than its border (nnU-Net), and the weighted sum is divided by the
summed weights. Inputs smaller than the window are padded (edge replicate) and cropped back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["window_starts", "gaussian_weight", "sliding_window_inference"]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets covering ``[0, size)`` with windows of ``window`` overlapping by ``overlap``.

    The last window is aligned to the end, so every position is covered and no window leaves
    the image. ``size`` must be >= ``window`` (pad first).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= window:
        return [0]
    step = max(1, int(round(window * (1 - overlap))))
    n = math.ceil((size - window) / step) + 1
    starts = [min(i * step, size - window) for i in range(n)]
    return sorted(set(starts))


def gaussian_weight(window: Sequence[int], sigma_scale: float = 0.125) -> Tensor:
    """A separable Gaussian importance map over the window, max 1, floored away from zero."""
    axes = []
    for w in window:
        x = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
        sigma = max(w * sigma_scale, 1e-3)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    weight = axes[0]
    for a in axes[1:]:
        weight = weight.unsqueeze(-1) * a
    weight = weight / weight.max()
    return weight.clamp_min(1e-3)


@torch.no_grad()
def sliding_window_inference(
    image: Tensor,
    predictor: Callable[[Tensor], Tensor],
    window: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
) -> Tensor:
    """Class probabilities (B, num_classes, *spatial) for ``image`` (B, C, *spatial).

    ``predictor`` maps a batch of windows (N, C, *window) to logits (N, num_classes, *window).
    """
    spatial = tuple(image.shape[2:])
    window = tuple(int(w) for w in window)
    if len(window) != len(spatial):
        raise ValueError(f"window {window} does not match the image's spatial shape {spatial}")
    # Pad up to the window where the image is smaller (replicate the edge, crop back at the end).
    pad_to = tuple(max(s, w) for s, w in zip(spatial, window, strict=False))
    if pad_to != spatial:
        pad: list[int] = []
        for s, p in reversed(list(zip(spatial, pad_to, strict=False))):
            pad += [0, p - s]
        image = F.pad(image, pad, mode="replicate")
    b = image.shape[0]
    out = torch.zeros((b, num_classes, *pad_to), dtype=torch.float32, device=image.device)
    norm = torch.zeros((1, 1, *pad_to), dtype=torch.float32, device=image.device)
    weight = gaussian_weight(window).to(image.device)[None, None]  # (1, 1, *window)
    starts = [window_starts(s, w, overlap) for s, w in zip(pad_to, window, strict=False)]
    slices = [
        tuple(slice(o, o + w) for o, w in zip(origin, window, strict=False))
        for origin in itertools.product(*starts)
    ]
    for i in range(0, len(slices), batch_size):
        chunk = slices[i:i + batch_size]
        windows = torch.cat([image[(slice(None), slice(None), *sl)] for sl in chunk])
        probs = predictor(windows).float().softmax(dim=1)  # (len(chunk) * B, K, *window)
        for j, sl in enumerate(chunk):
            region = (slice(None), slice(None), *sl)
            out[region] += probs[j * b:(j + 1) * b] * weight
            norm[region] += weight
    out = out / norm
    return out[(slice(None), slice(None), *(slice(0, s) for s in spatial))]
