"""Checks of a round's replies against each other: norm against the round's median, direction.

Per-reply checks (:mod:`aggregator.validation`) cannot tell a large honest update from a large
malicious one; these compare every reply with the round it belongs to. Each part of the state
(student, teacher, center) is judged on its own, since their norms differ by 10-100x:

1. **Norm.** A student or teacher update whose norm exceeds ``norm_factor`` x the median of
   that part over the round's replies is an outlier and the reply is *rejected* (not clipped):
   a step 5x larger than the round's typical one is outside the measured honest spread (2.7x),
   and clipping it would still let its direction in at the site's full weight. The center's
   outliers are *clipped* to ``norm_factor`` x its median (:data:`CLIPPED_PARTS`): an honest
   site reached 5.5x. ``clipped_mean`` clips what remains to the median of the replies that
   were not rejected (:func:`clip_scales`).
2. **Direction.** The cosine between a reply's teacher update and the coordinate-wise median
   of the *other* surviving replies' teacher updates; below ``min_cosine`` the reply is
   rejected (a sign-flipped update). Leave-one-out, because a reply must not be judged against
   a reference it helped make: with 4-5 replies, a flipped one pulls the median of all of them
   far enough to land at +0.09 to +0.25 in round 1 and pass, against -0.26 or below without
   itself. Only the teacher: it is the EMA of the student, so from round 2 it carries the pull
   towards the global student that every honest site shares (honest +0.13 and up, flipped
   -0.48 and down), and in round 1 it follows the student's first steps (honest -0.017 and up,
   flipped -0.26 and down). The student's own updates barely agree after round 1 (honest down
   to -0.08, flipped from -0.15 in the benchmark; they overlapped in an ad-hoc sweep), so a
   threshold on them has little or no margin; the center is not checked either (honest
   center updates measured cosines down to -0.77). Measured with benchmarks/bench_direction.py
   (docs/benchmarks.md, "The direction check's margin"). Needs at least 3 surviving replies.
3. **Replay** is judged per reply as it arrives (:mod:`aggregator.replays`): a copy or a near
   copy of a state sent or accepted earlier is rejected.

Pure torch, no flwr; every function takes plain mappings so a streaming caller can use them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from aggregator.order_stats import leave_one_out_medians
from aggregator.spill import chunk_size, read_slice
from aggregator.validation import PARTS, part_of

__all__ = ["ACCEPTED", "CLIPPED", "REJECTED", "Verdict", "round_medians",
           "norm_outliers", "outlier_clips", "CLIPPED_PARTS", "cosines_to_others", "clip_scales",
           "clip_state", "screen_round", "DIRECTION_PARTS",
           "MIN_SITES_FOR_DIRECTION"]

ACCEPTED, CLIPPED, REJECTED = "accepted", "clipped", "rejected"
DIRECTION_PARTS = ("teacher",)
MIN_SITES_FOR_DIRECTION = 3


@dataclass
class Verdict:
    """What the round's screening decided for one reply (a rounds.jsonl ``decisions`` entry)."""

    action: str = ACCEPTED  # accepted | clipped | rejected
    reason: str | None = None
    # What the site itself is told (aggregator/verdicts.py): the check and the site's own
    # numbers, without the round's medians or cosines (they come from the other sites' updates).
    site_reason: str | None = None
    vs_median: dict[str, float | None] = field(default_factory=dict)  # norm / round median
    cosine: dict[str, float] = field(default_factory=dict)  # vs the others' median
    scales: dict[str, float] = field(default_factory=dict)  # clip factors < 1, by part

    def as_row(self) -> dict:
        row: dict = {"action": self.action, "vs_median": self.vs_median}
        if self.reason is not None:
            row["reason"] = self.reason
        if self.cosine:
            row["cosine"] = self.cosine
        if self.scales:
            row["clip_scale"] = self.scales
        return row


def round_medians(norms: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The median update norm of each part over the round's replies (label -> part -> norm)."""
    return {part: statistics.median(n[part] for n in norms.values()) for part in PARTS} \
        if norms else {}


def _ratio(norm: float, median: float) -> float | None:
    if median > 0:
        return norm / median
    return 0.0 if norm == 0 else None  # every other site left this part unchanged


# Parts whose outliers are clipped to norm_factor x the median instead of rejected: the center,
# a running mean of the teacher's logits, moves with the kind of data a site trained this round.
# An honest CT-only site reached 5.5x the median center update while the other two trained
# X-rays (docs/quality.md's long run, uncompressed exchange, round 30).
CLIPPED_PARTS = ("center",)
REJECTED_PARTS = tuple(p for p in PARTS if p not in CLIPPED_PARTS)


def norm_outliers(norms: Mapping[str, Mapping[str, float]], medians: Mapping[str, float],
                  factor: float, parts: tuple[str, ...] = REJECTED_PARTS) -> dict[str, str]:
    """label -> reason, for replies with one of ``parts`` above ``factor`` x its median."""
    out: dict[str, str] = {}
    for label, values in norms.items():
        part = _outlier_part(values, medians, factor, parts)
        if part is not None:
            ratio = _ratio(values[part], medians[part])
            shown = "a part every other site left unchanged" if ratio is None \
                else f"{ratio:.3g} x the round median {medians[part]:.4g}"
            out[label] = (f"{part} update norm {values[part]:.4g} is {shown} "
                          f"(norm_factor {factor:g})")
    return out


def _outlier_part(values: Mapping[str, float], medians: Mapping[str, float], factor: float,
                  parts: tuple[str, ...] = REJECTED_PARTS) -> str | None:
    """The first of ``parts`` whose norm exceeds ``factor`` x its round median, or None."""
    for part in parts:
        ratio = _ratio(values[part], medians[part])
        if ratio is None or ratio > factor:
            return part
    return None


def outlier_clips(norms: Mapping[str, Mapping[str, float]], medians: Mapping[str, float],
                  factor: float, parts: tuple[str, ...] = CLIPPED_PARTS
                  ) -> dict[str, dict[str, float]]:
    """label -> {part: scale}: what brings each of ``parts`` down to ``factor`` x its median."""
    out: dict[str, dict[str, float]] = {}
    for label, values in norms.items():
        for part in parts:
            ratio = _ratio(values[part], medians[part])
            if ratio is None:  # every other site left it unchanged: so does this one
                out.setdefault(label, {})[part] = 0.0
            elif ratio > factor:
                out.setdefault(label, {})[part] = factor / ratio
    return out


@torch.no_grad()
def cosines_to_others(states: Mapping[str, Mapping[str, torch.Tensor]],
                      global_state: Mapping[str, torch.Tensor],
                      parts: tuple[str, ...] = DIRECTION_PARTS) -> dict[str, dict[str, float]]:
    """Cosine of each reply's update with the coordinate-wise median of the others' updates.

    The median of an even count is the mean of the two middle values. One slice of one tensor
    at a time (:func:`aggregator.spill.chunk_size`), so the extra memory stays ~50 MB however
    many replies and however large the tensor. Needs >= 2 replies.
    """
    labels = list(states)
    dot = {lb: dict.fromkeys(parts, 0.0) for lb in labels}
    own = {lb: dict.fromkeys(parts, 0.0) for lb in labels}
    ref = {lb: dict.fromkeys(parts, 0.0) for lb in labels}
    step = chunk_size(2 * len(labels))  # the replies' slices and their references
    for name, g in global_state.items():
        part = part_of(name)
        if part not in parts:
            continue
        flat = g.reshape(-1)
        for start in range(0, flat.numel(), step):  # a slice of the tensor at a time
            stop = min(start + step, flat.numel())
            # float32 updates (a sort of float64 costs twice as much); sums in float64
            g32 = flat[start:stop].to(torch.float32)
            deltas = torch.stack([read_slice(states[lb], name, start, stop).to(torch.float32)
                                  - g32 for lb in labels])
            medians = leave_one_out_medians(deltas)
            dots = (deltas * medians).sum(1, dtype=torch.float64).tolist()
            owns = deltas.pow(2).sum(1, dtype=torch.float64).tolist()
            refs = medians.pow_(2).sum(1, dtype=torch.float64).tolist()
            for i, lb in enumerate(labels):
                dot[lb][part] += dots[i]
                own[lb][part] += owns[i]
                ref[lb][part] += refs[i]
    out: dict[str, dict[str, float]] = {}
    for lb in labels:
        out[lb] = {}
        for part in parts:
            denom = math.sqrt(own[lb][part] * ref[lb][part])
            out[lb][part] = dot[lb][part] / denom if denom > 0 else 1.0  # no direction to judge
    return out


def clip_scales(norms: Mapping[str, float], medians: Mapping[str, float]) -> dict[str, float]:
    """Per part, the factor (< 1) that brings a reply's update down to the round's median."""
    return {part: medians[part] / norms[part] for part in PARTS
            if norms[part] > medians[part] > 0}


class _Clipped(Mapping[str, torch.Tensor]):
    """``global + scale x (state - global)``, computed per tensor as it is read."""

    def __init__(self, state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
                 scales: Mapping[str, float]):
        self._state, self._global, self._scales = state, global_state, dict(scales)

    @torch.no_grad()
    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._state[name]
        scale = self._scales.get(part_of(name))
        if scale is None or name not in self._global:
            return value
        g64 = self._global[name].to(torch.float64)
        return (g64 + scale * (value.to(torch.float64) - g64)).to(self._global[name].dtype)

    @torch.no_grad()
    def slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        value = read_slice(self._state, name, start, stop)
        scale = self._scales.get(part_of(name))
        if scale is None or name not in self._global:
            return value
        g = self._global[name].reshape(-1)[start:stop].to(torch.float64)
        return (g + scale * (value.to(torch.float64) - g)).to(self._global[name].dtype)

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def clip_state(state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
               scales: Mapping[str, float]) -> Mapping[str, torch.Tensor]:
    """global + scale x (state - global) for the tensors of each scaled part (read lazily, so
    a reply parked on disk is clipped one tensor at a time)."""
    return _Clipped(state, global_state, scales)


def screen_round(
    norms: Mapping[str, Mapping[str, float]],
    states: Mapping[str, Mapping[str, torch.Tensor]],
    global_state: Mapping[str, torch.Tensor],
    norm_factor: float,
    min_cosine: float | None,
    clip_to_median: bool,
) -> tuple[dict[str, float], dict[str, Verdict]]:
    """Judge the round's validated replies; returns the part medians and a verdict per label."""
    medians = round_medians(norms)
    verdicts = {lb: Verdict(vs_median={p: _ratio(n[p], medians[p]) for p in PARTS})
                for lb, n in norms.items()}
    for label, reason in norm_outliers(norms, medians, norm_factor).items():
        v = verdicts[label]
        v.action, v.reason = REJECTED, reason
        part = _outlier_part(norms[label], medians, norm_factor)
        v.site_reason = (f"{part} update norm {norms[label][part]:.4g} is above norm_factor "
                         f"{norm_factor:g} x the round's median update norm")
    for label, scales in outlier_clips(norms, medians, norm_factor).items():
        v = verdicts[label]
        if v.action != REJECTED:
            v.action, v.scales = CLIPPED, scales
            v.reason = "clipped to norm_factor x the round median (" + ", ".join(
                f"{p} x{s:.3g}" for p, s in scales.items()) + f"; norm_factor {norm_factor:g})"
            v.site_reason = (f"{', '.join(scales)} update scaled down to norm_factor "
                             f"{norm_factor:g} x the round's median update norm")
    survivors = [lb for lb in norms if verdicts[lb].action != REJECTED]
    if min_cosine is not None and len(survivors) >= MIN_SITES_FOR_DIRECTION:
        cosines = cosines_to_others({lb: states[lb] for lb in survivors}, global_state)
        for label in survivors:
            verdicts[label].cosine = cosines[label]
            low = [p for p, c in cosines[label].items() if c < min_cosine]
            if low:
                verdicts[label].action = REJECTED
                verdicts[label].reason = (
                    f"{low[0]} update points against the other replies' median update (cosine "
                    f"{cosines[label][low[0]]:.3f} < min_cosine {min_cosine:g})")
                verdicts[label].site_reason = (
                    f"{low[0]} update points against the round's other updates (cosine to their "
                    f"median below min_cosine {min_cosine:g})")
    if clip_to_median:  # to the median of the replies that count: a rejected one sets nothing
        kept = round_medians({lb: n for lb, n in norms.items()
                              if verdicts[lb].action != REJECTED})
        for label in norms:
            v = verdicts[label]
            if v.action != REJECTED:
                v.scales = {**v.scales, **clip_scales(norms[label], kept)}
                if v.scales:
                    v.action = CLIPPED
                    v.reason = "clipped to the round's median norm (" + ", ".join(
                        f"{p} x{s:.3g}" for p, s in v.scales.items()) + ")"
                    v.site_reason = (f"{', '.join(v.scales)} update scaled down to the round's "
                                     "median update norm (aggregation clipped_mean)")
    return medians, verdicts
