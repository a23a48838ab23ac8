"""Frozen features per encoder stage: dense at sampled voxels, or one vector per image.

Dense (segmentation): each case is cut into non-overlapping windows of the task's input size
(the last ones padded with the case's minimum, as training patches are); every stage map of a
window is upsampled to the window's voxels (trilinear / bilinear) at the sampled voxels.
Only windows that hold a sampled voxel are encoded.

Global (classification): per stage, the stage's CLS token next to the mean of its patch tokens
(the read-out the fine-tuning classifier uses at the last stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_unimiss.finetune.config import FinetuneConfig
from fed_unimiss.finetune.tasks import ClsCase, SegCase, cls_input, to_network_input

__all__ = ["VoxelSample", "sample_voxels", "dense_features", "global_features", "num_stages"]


@dataclass
class VoxelSample:
    """Voxels drawn from a list of cases: case index, coordinates (N, ndim), class (N,)."""

    case: np.ndarray
    coords: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def sample_voxels(cases: list[SegCase], per_class: int, max_per_class: int,
                  rng: np.random.Generator) -> VoxelSample:
    """A seeded, class-balanced sample: up to ``per_class`` voxels of every class in every case,
    then at most ``max_per_class`` of each class over all cases (seg2d on CT has many slices)."""
    case_ids, coords, labels = [], [], []
    for i, case in enumerate(cases):
        flat = case.labels.reshape(-1)
        for c in np.unique(flat):
            where = np.flatnonzero(flat == c)
            pick = rng.choice(where, size=min(per_class, len(where)), replace=False)
            coords.append(np.stack(np.unravel_index(pick, case.labels.shape), axis=1))
            case_ids.append(np.full(len(pick), i))
            labels.append(np.full(len(pick), int(c)))
    sample = VoxelSample(np.concatenate(case_ids), np.concatenate(coords),
                         np.concatenate(labels).astype(np.int64))
    keep = np.concatenate([
        rng.permutation(np.flatnonzero(sample.labels == c))[:max_per_class]
        for c in np.unique(sample.labels)])
    keep.sort()
    return VoxelSample(sample.case[keep], sample.coords[keep], sample.labels[keep])


def num_stages(encoder: nn.Module) -> int:
    return len(encoder.config.embed_dims)


def _padded(image: np.ndarray, window: tuple[int, ...]) -> np.ndarray:
    """``image`` padded at the end of each axis to a whole number of windows."""
    width = [(0, math.ceil(s / w) * w - s) for s, w in zip(image.shape, window, strict=True)]
    if not any(p for _, p in width):
        return image
    return np.pad(image, width, mode="constant", constant_values=float(image.min()))


def _at_voxels(fmap: Tensor, local: np.ndarray, window: tuple[int, ...]) -> Tensor:
    """(n, C): ``fmap`` (C, *grid) upsampled to ``window`` (trilinear / bilinear,
    ``align_corners=False``, as ``F.interpolate``) and read at the voxels ``local`` (n, ndim),
    computed at those voxels only: upsampling whole windows would cost 10x the encoder."""
    size = torch.tensor(window, dtype=torch.float32)
    # Voxel i of a window of W sits at normalised coordinate 2 (i + 0.5) / W - 1 in both
    # conventions; "border" repeats the edge as interpolate's clamped source index does.
    where = 2 * (torch.from_numpy(local).float() + 0.5) / size - 1  # (n, ndim) in (z, y, x)
    grid = where.flip(-1).reshape(1, len(local), *([1] * (len(window) - 1)), len(window))
    out = F.grid_sample(fmap[None], grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # (1, C, n, 1[, 1])
    return out.reshape(fmap.shape[0], len(local)).T


@torch.no_grad()
def _encode(encoder: nn.Module, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    device = next(encoder.parameters()).device
    feats = encoder.forward_intermediates(x.to(device), decoder=False)
    return [m.float().cpu() for m in feats.encoder_maps], [c.float().cpu()
                                                            for c in feats.encoder_cls]


def dense_features(encoder: nn.Module, cases: list[SegCase], sample: VoxelSample,
                   window: tuple[int, ...], batch_size: int) -> list[Tensor]:
    """Per stage, the (N, C_i) features of the sampled voxels, in the sample's order."""
    out = [torch.zeros(len(sample), d) for d in encoder.config.embed_dims]
    jobs = []  # (case, window origin, rows of the sample inside it, their local coordinates)
    for i in np.unique(sample.case):
        rows = np.flatnonzero(sample.case == i)
        cell = sample.coords[rows] // np.asarray(window)
        for key in sorted({tuple(c) for c in cell.tolist()}):
            inside = rows[(cell == key).all(axis=1)]
            origin = np.asarray(key) * np.asarray(window)
            jobs.append((int(i), origin, inside, sample.coords[inside] - origin))
    padded: dict[int, np.ndarray] = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        tiles = []
        for i, origin, _, _ in chunk:
            if i not in padded:
                padded = {i: _padded(cases[i].image, window)}  # one case in memory at a time
            sl = tuple(slice(o, o + w) for o, w in zip(origin, window, strict=True))
            tiles.append(to_network_input(padded[i][sl]))
        maps, _ = _encode(encoder, torch.stack(tiles))
        for s, fmap in enumerate(maps):
            for b, (_, _, rows, local) in enumerate(chunk):
                out[s][torch.from_numpy(rows)] = _at_voxels(fmap[b], local, window)
    return out


def global_features(encoder: nn.Module, cases: list[ClsCase], cfg: FinetuneConfig,
                    batch_size: int) -> list[Tensor]:
    """Per stage, (N, 2 C_i): the stage's CLS token next to its mean patch token, per image."""
    per_stage: list[list[Tensor]] = [[] for _ in encoder.config.embed_dims]
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        maps, cls = _encode(encoder, torch.stack([cls_input(c, cfg) for c in chunk]))
        for s, (fmap, token) in enumerate(zip(maps, cls, strict=True)):
            per_stage[s].append(torch.cat([token, fmap.flatten(2).mean(dim=2)], dim=1))
    return [torch.cat(parts) for parts in per_stage]
