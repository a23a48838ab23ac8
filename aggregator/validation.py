"""Checks every site reply passes before the aggregator folds it.

A reply is dropped, with a reason, when its tensors do not match the global state (names,
shapes, dtypes), hold a non-finite value, move too far from the global state (L2 norm of the
update above ``max_update_norm``), or when its counts are not non-negative integers with at least
one of them positive. Reasons are built from our own tensor names and numbers only, never from
text the site sent, so nothing a site controls reaches the aggregator's logs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fed_unimiss import exchange as ex

__all__ = ["ReplyRejected", "SiteReport", "parse_report", "validate_state", "site_label"]

class ReplyRejected(ValueError):
    """A reply the aggregator will not use; ``str(e)`` is the reason logged and recorded."""


@dataclass(frozen=True)
class SiteReport:
    """The numbers one site reported with its state."""

    samples_2d: int
    samples_3d: int
    metrics: dict[str, float]

    @property
    def samples(self) -> int:
        return self.samples_2d + self.samples_3d


def _count(metrics: Mapping[str, Any], key: str) -> int:
    if key not in metrics:
        raise ReplyRejected(f"metric {key!r} missing")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyRejected(f"count {key!r} is not a number")
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ReplyRejected(f"count {key!r} must be a non-negative integer, got {value!r}")
    return int(value)


def parse_report(metrics: Mapping[str, Any]) -> SiteReport:
    """Counts and scalar metrics of a train reply's MetricRecord; raises ``ReplyRejected``."""
    samples_2d = _count(metrics, ex.SAMPLES_2D)
    samples_3d = _count(metrics, ex.SAMPLES_3D)
    if samples_2d == 0 and samples_3d == 0:
        raise ReplyRejected("both sample counts are zero (the site trained on nothing)")
    scalars: dict[str, float] = {}
    for key in ex.TRAIN_METRICS:
        value = metrics.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReplyRejected(f"metric {key!r} is not a number")
        if not math.isfinite(value):
            raise ReplyRejected(f"metric {key!r} is not finite")
        scalars[key] = float(value)
    return SiteReport(samples_2d, samples_3d, scalars)


def validate_state(
    state: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    max_update_norm: float,
) -> float:
    """Check a reply state against the global state; returns the update's L2 norm.

    Raises ``ReplyRejected`` naming the first problem: missing or unexpected tensors, a shape or
    dtype mismatch, a non-finite value, or an update norm above ``max_update_norm``.
    """
    missing = [name for name in global_state if name not in state]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ReplyRejected(f"{len(missing)} tensor(s) missing: {shown}")
    unexpected = sum(1 for name in state if name not in global_state)
    if unexpected:
        raise ReplyRejected(f"{unexpected} unexpected tensor(s)")
    sq = 0.0
    for name, ref in global_state.items():
        value = state[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise ReplyRejected(
                f"{name}: shape {tuple(value.shape)} != expected {tuple(ref.shape)}"
            )
        if value.dtype != ref.dtype:
            raise ReplyRejected(f"{name}: dtype {value.dtype} != expected {ref.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise ReplyRejected(f"{name}: non-finite values")
        sq += float((value.to(torch.float64) - ref.to(torch.float64)).pow(2).sum())
    norm = math.sqrt(sq)
    if not math.isfinite(norm) or norm > max_update_norm:
        raise ReplyRejected(f"update norm {norm:.4g} exceeds max_update_norm {max_update_norm:.4g}")
    return norm


def site_label(declared: Any, node_id: int) -> str:
    """The name a site appears under in logs and rounds.jsonl.

    The site's declared ``site-name`` (a label hospital IT chose, e.g. "A") when it is a short
    plain identifier; otherwise ``node-<id>``. Anything else a site might put there (a path, free
    text) is ignored rather than echoed.
    """
    if ex.is_valid_site_name(declared):
        return str(declared)
    return f"node-{node_id}"
