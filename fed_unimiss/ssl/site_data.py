"""``SiteData``: a site's CT and X-ray datasets plus deterministic, resumable batch streams.

The batch a global step draws is a pure function of (seed, kind, position in that kind's stream):
each pass over a dataset is a permutation seeded by (seed, kind, pass number), and the position of
step s in its kind's stream comes from :func:`fed_unimiss.ssl.schedules.phase_steps_before`. So a
run resumed at step s, or a federated round starting at step s, draws exactly the batches a
continuous run would have drawn, without replaying anything.

A corrupt or unreadable item (the dataset returns None, raises, or gives a wrong shape or a
non-finite value) is skipped and counted, never fatal; the log names the kind and the index, never
a path.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fed_unimiss.data.datasets import array_problem
from fed_unimiss.ssl.views import step_generator

__all__ = ["SiteData", "Kind"]

log = logging.getLogger(__name__)

Kind = Literal["2d", "3d"]


class SiteData:
    """What :meth:`SelfDistillation.train_steps` needs from a site.

    Args:
        ct: dataset of CT tiles, items (1, D, H, W) float32 (HU / hu_scale) or None.
        xray: dataset of X-rays, items (1, S, S) float32 in [0, 1] or None.
        summary: a non-identifying description (counts) for checkpoints and logs.
    """

    def __init__(self, ct: Any = None, xray: Any = None,
                 summary: dict[str, Any] | None = None) -> None:
        self.ct = ct if ct is not None and len(ct) > 0 else None
        self.xray = xray if xray is not None and len(xray) > 0 else None
        self.summary = dict(summary or {})
        self._perms: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()

    @classmethod
    def from_index(cls, index: Any) -> SiteData:
        """Build from a data-layer ``SiteIndex`` (``build_cache`` result)."""
        from fed_unimiss.data.datasets import CTTileDataset, XrayDataset

        ct = CTTileDataset(index) if len(index.ct_tiles) else None
        xray = XrayDataset(index) if len(index.xrays) else None
        return cls(ct=ct, xray=xray, summary=index.summary())

    @property
    def has_2d(self) -> bool:
        return self.xray is not None

    @property
    def has_3d(self) -> bool:
        return self.ct is not None

    def dataset(self, kind: Kind) -> Any:
        ds = self.xray if kind == "2d" else self.ct
        if ds is None:
            raise ValueError(f"this site has no {'X-ray' if kind == '2d' else 'CT'} data")
        return ds

    def __len__(self) -> int:
        return sum(len(d) for d in (self.ct, self.xray) if d is not None)

    def _permutation(self, kind: Kind, seed: int, epoch: int) -> np.ndarray:
        key = (kind, seed, epoch)
        if key not in self._perms:
            n = len(self.dataset(kind))
            gen = step_generator(seed, "order", kind, epoch)
            self._perms[key] = torch.randperm(n, generator=gen).numpy()
            while len(self._perms) > 8:
                self._perms.popitem(last=False)
        return self._perms[key]

    def batch_indices(self, kind: Kind, position: int, batch_size: int, seed: int) -> list[int]:
        """Dataset indices of the ``position``-th batch of ``kind`` (crossing passes as needed)."""
        n = len(self.dataset(kind))
        out = []
        for k in range(position * batch_size, (position + 1) * batch_size):
            epoch, offset = divmod(k, n)
            out.append(int(self._permutation(kind, seed, epoch)[offset]))
        return out

    def load(self, kind: Kind, indices: list[int], min_depth: int = 1) -> tuple[list[Tensor], int]:
        """Read items; returns the good ones and how many were skipped."""
        ds = self.dataset(kind)
        good, skipped = [], 0
        for i in indices:
            try:
                item = ds[i]
            except Exception as e:  # noqa: BLE001 - one bad item must never stop a site
                log.warning("skipping %s item %d: unreadable (%s)", kind, i, type(e).__name__)
                skipped += 1
                continue
            reason = _check_item(kind, item, min_depth)
            if reason is not None:
                log.warning("skipping %s item %d: %s", kind, i, reason)
                skipped += 1
                continue
            good.append(torch.as_tensor(item, dtype=torch.float32))
        return good, skipped


def _check_item(kind: Kind, item: Any, min_depth: int) -> str | None:
    """Why ``item`` cannot be trained on, or None if it is fine."""
    if kind == "2d":
        return array_problem(item, "an X-ray of shape (1, H, W)",
                             lambda s: len(s) == 3 and s[0] == 1)
    return array_problem(item, f"a CT tile of shape (1, D>={min_depth}, H, W)",
                         lambda s: len(s) == 4 and s[0] == 1 and s[1] >= min_depth)
