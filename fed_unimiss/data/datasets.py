"""Torch datasets over a :class:`SiteIndex`: cached arrays in, training tensors out.

Arrays are opened with ``np.load(mmap_mode="r")``, so a dataset costs no memory up front and
DataLoader workers share the page cache. A cache entry that cannot be read (deleted, truncated,
wrong shape, non-finite) does not stop training: ``__getitem__`` logs it (site-local log, may name
the file), counts it in ``skipped`` and returns ``None`` (the trainer's ``SiteData.load`` skips it).
``skipped`` counts in the process that reads the item, so with ``num_workers > 0`` each
worker keeps its own count (use ``num_workers=0`` when the count matters).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fed_unimiss.data.cache import CacheEntry, SiteIndex

__all__ = ["CTTileDataset", "XrayDataset", "array_problem"]

logger = logging.getLogger(__name__)


def array_problem(item: Any, expected: str, shape_ok: Callable[[tuple[int, ...]], bool],
                  dtype: np.dtype | None = None) -> str | None:
    """Why ``item`` cannot be trained on (missing, not an array, wrong shape or dtype,
    non-finite), or None: the one item check of the cache's datasets and the trainer's stream."""
    if item is None:
        return "corrupt cache entry"
    if not isinstance(item, (torch.Tensor, np.ndarray)):
        return f"expected an array, got {type(item).__name__}"
    shape = tuple(item.shape)
    if not shape_ok(shape) or (dtype is not None and item.dtype != dtype):
        return f"holds {item.dtype} {shape}, expected {expected}"
    finite = torch.isfinite(item).all() if isinstance(item, torch.Tensor) else np.isfinite(item).all()
    return None if bool(finite) else "non-finite values"


class _CachedArrays(Dataset):
    def __init__(self, entries: list[CacheEntry], shapes: list[tuple[int, ...]]) -> None:
        self.entries = list(entries)
        self.shapes = shapes
        self.skipped = 0
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def groups(self) -> list[str]:
        """The patient key of every item, in item order (for patient-level DP sampling)."""
        return [e.patient_key for e in self.entries]

    def _skip(self, i: int, reason: str) -> None:
        self.skipped += 1
        if i not in self._reported:
            self._reported.add(i)
            logger.warning("skipping cache entry %s: %s", self.entries[i].path, reason)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        entry, expected = self.entries[i], self.shapes[i]
        try:
            array = np.load(entry.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            self._skip(i, f"unreadable ({type(e).__name__}: {e})")
            return None
        problem = array_problem(array, f"float32 {expected}", lambda shape: shape == expected,
                                np.dtype(np.float32))
        if problem is not None:
            self._skip(i, problem)
            return None
        return torch.from_numpy(np.array(array)).unsqueeze(0)


class CTTileDataset(_CachedArrays):
    """Items: float32 (1, ct_tile_depth, H, W) tensors of HU / hu_scale (not clipped).

    H and W depend on each volume's field of view after resampling to 1 mm, so tiles of
    different volumes may differ in-plane; views crop them to a common size.
    """

    def __init__(self, index: SiteIndex) -> None:
        shapes = [(index.ct_tile_depth, *e.shape[1:]) for e in index.ct_tiles]
        super().__init__(index.ct_tiles, shapes)


class XrayDataset(_CachedArrays):
    """Items: float32 (1, xray_size, xray_size) tensors in [0, 1], bright = dense."""

    def __init__(self, index: SiteIndex) -> None:
        size = index.xray_size
        super().__init__(index.xrays, [(size, size)] * len(index.xrays))

