"""Dimension-aware aggregation of site states: pure torch, one reply folded at a time.

Each tensor has a class (``2d``, ``3d`` or ``shared``, see
:func:`fed_unimiss.exchange.classify_exchange_keys`) and each reply carries two counts. A site is
*eligible* for a tensor when its weight for that class is positive
(:func:`fed_unimiss.exchange.class_weight`). CT slices count as 2D samples, so a CT-only site
moves 2D tensors too; an X-ray-only site never moves 3D tensors.
A tensor no eligible site trained keeps its global value.

``WeightedMean`` keeps one float32 running sum of weighted *updates* (reply - global) per
tensor, so memory is one state plus the tensor being folded, whatever the number of sites (an
update is small against the weights, so float32 loses nothing a float64 sum of states would
keep). The robust modes (coordinate-wise median, trimmed mean) need every eligible value of a
coordinate at once: they keep a reference to each reply (the strategy's replies are parked on
disk, aggregator/spill.py) and reduce one tensor at a time in ``result``, so their memory is the
round's values of one tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from aggregator.order_stats import coordinate_median, sorted_rows
from aggregator.spill import chunk_size, read_slice
from fed_unimiss.exchange import class_weight

__all__ = ["Aggregator", "WeightedMean", "CoordinateRobust", "make_aggregator"]


class Aggregator(Protocol):
    """Folds validated replies one by one; ``result`` returns the new global state."""

    def add(self, state: Mapping[str, torch.Tensor], samples_2d: int, samples_3d: int) -> None:
        ...

    def result(self) -> dict[str, torch.Tensor]:
        ...


class WeightedMean:
    """Sample-weighted mean per tensor over the sites eligible for its class (FedAvg, by class)."""

    def __init__(self, global_state: Mapping[str, torch.Tensor], classes: Mapping[str, str]):
        self._global = global_state
        self._classes = classes
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = dict.fromkeys(global_state, 0.0)

    @torch.no_grad()
    def add(self, state: Mapping[str, torch.Tensor], samples_2d: int, samples_3d: int) -> None:
        for name in self._global:
            w = class_weight(self._classes[name], samples_2d, samples_3d)
            if w <= 0:
                continue
            ref = self._global[name]
            update = state[name].detach().to(torch.float32) - ref.to(torch.float32)
            if name in self._sums:
                self._sums[name].add_(update, alpha=w)
            else:
                self._sums[name] = update.mul_(w)
            self._weights[name] += w

    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, ref in self._global.items():
            w = self._weights[name]
            if w > 0:
                total = self._sums.pop(name)  # freed as the result is built
                out[name] = total.div_(w).add_(ref.to(torch.float32)).to(ref.dtype)  # in place
            else:
                out[name] = ref.clone()
        return out


class CoordinateRobust:
    """Coordinate-wise median or trimmed mean over eligible sites (unweighted; Yin et al. 2018).

    Robust to a minority of arbitrary replies that pass validation. It cannot weight by sample
    counts (a median has no natural weights), and it holds every eligible reply of the round.
    """

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        classes: Mapping[str, str],
        mode: str = "median",
        trim_fraction: float = 0.1,
    ):
        if mode not in ("median", "trimmed_mean"):
            raise ValueError(f"robust mode {mode!r}: expected 'median' or 'trimmed_mean'")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction: must be in [0, 0.5), got {trim_fraction}")
        self._global = global_state
        self._classes = classes
        self._mode = mode
        self._trim = trim_fraction
        # (reply, its counts): read one tensor at a time in ``result``, never copied whole here.
        self._replies: list[tuple[Mapping[str, torch.Tensor], int, int]] = []

    def add(self, state: Mapping[str, torch.Tensor], samples_2d: int, samples_3d: int) -> None:
        self._replies.append((state, samples_2d, samples_3d))

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        n = stacked.shape[0]
        if self._mode == "median":
            # The mean of the two middle values with an even count (two sites give their
            # mean, as numpy's median does), not torch.median's lower one.
            return coordinate_median(stacked)
        k = min(int(self._trim * n), (n - 1) // 2)
        return torch.stack(sorted_rows(stacked)[k:n - k]).mean(dim=0)

    def result(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, ref in self._global.items():
            eligible = [state for state, s2, s3 in self._replies
                        if class_weight(self._classes[name], s2, s3) > 0]
            if not eligible:
                out[name] = ref.clone()
                continue
            flat = torch.empty(ref.numel(), dtype=ref.dtype)
            step = chunk_size(len(eligible))
            for start in range(0, ref.numel(), step):  # a slice of the tensor at a time
                stop = min(start + step, ref.numel())
                values = torch.stack([read_slice(s, name, start, stop).to(torch.float64)
                                      for s in eligible])
                flat[start:stop] = self._reduce(values).to(ref.dtype)
            out[name] = flat.view(ref.shape)
        return out


def make_aggregator(
    mode: str,
    global_state: Mapping[str, torch.Tensor],
    classes: Mapping[str, str],
    trim_fraction: float = 0.1,
) -> Aggregator:
    """The aggregator for ``FederationConfig.aggregation``.

    ``clipped_mean`` is the weighted mean of updates the strategy has already clipped to the
    round's median norm (:mod:`aggregator.screening`): the clip needs the whole round.
    """
    if mode in ("mean", "clipped_mean"):
        return WeightedMean(global_state, classes)
    return CoordinateRobust(global_state, classes, mode, trim_fraction)
