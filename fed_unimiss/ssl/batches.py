"""The items of one training step and their views: what the engine evaluates on and what a
:class:`~fed_unimiss.ssl.gradient_step.GradientStep` trains on.

Views are seeded by (seed, tag, step, the item's position in the step's global batch), so one
process and N data-parallel processes see the same views of the same items.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from fed_unimiss.ssl import distributed
from fed_unimiss.ssl.config import SSLConfig
from fed_unimiss.ssl.schedules import Phase
from fed_unimiss.ssl.site_data import SiteData
from fed_unimiss.ssl.views import ct_views, step_generator, xray_views

__all__ = ["Batch", "item_views", "stream_batch"]

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """The items of one step: ``views`` stacked as the step's loss wants them, or None."""

    views: list[Tensor] | Tensor | None
    size: int      # samples (plain) or sampled patients (DP) that made it into ``views``
    skipped: int   # corrupt or unusable items
    total: int = 0  # usable items over all data-parallel processes (the engine sets it)


def item_views(items: list[Tensor], positions: list[int], phase: Phase, cfg: SSLConfig, tag: str,
               step: int) -> tuple[list[list[Tensor]], int]:
    """The two views of every item, and how many items could not be viewed.

    An item's views are seeded by (seed, tag, step, its position in the step's global batch), so
    they do not depend on which process of a data-parallel group makes them.
    """
    make = xray_views if phase == "2d" else ct_views
    per_sample, skipped = [], 0
    for item, pos in zip(items, positions, strict=True):
        try:
            per_sample.append(make(item, step_generator(cfg.seed, tag, step, pos), cfg))
        except ValueError as e:
            log.warning("skipping %s item at position %d of step %d: %s", phase, pos, step, e)
            skipped += 1
    return per_sample, skipped


def stream_batch(data: SiteData, phase: Phase, position: int, tag: str, step: int,
                 cfg: SSLConfig, device: torch.device) -> Batch:
    """Two stacked views of this process's shard of the batch at ``position`` of ``phase``'s
    seeded stream, on ``device``."""
    bs = cfg.batch_size_2d if phase == "2d" else cfg.batch_size_3d
    items, positions, skipped = [], [], 0
    for pos, i in distributed.shard(data.batch_indices(phase, position, bs, cfg.seed)):
        good, bad = data.load(phase, [i], min_depth=cfg.view_depth)
        items += good
        positions += [pos] * len(good)
        skipped += bad
    per_sample, bad = item_views(items, positions, phase, cfg, tag, step)
    if not per_sample:
        return Batch(None, 0, skipped + bad)
    views = [torch.stack([v[i] for v in per_sample]).to(device) for i in range(2)]
    return Batch(views, len(per_sample), skipped + bad)
