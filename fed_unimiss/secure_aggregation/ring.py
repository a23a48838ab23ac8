"""A site's flat float update as integers mod 2^k, and the masked sum back as a weighted mean.

Masks cancel only in a finite ring (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017), so before masking every site maps its update to
integers mod 2^k with the *same* map, announced by the aggregator before the round in a
:class:`RingPlan`:

- **Scales.** One float32 scale per block of ``block`` consecutive coordinates, the same for
  every site. Per-site scales (as in the int8 exchange) would break the sum: sum_i q_i s_i is not
  (sum_i q_i) s. The aggregator derives them from a clip bound (:func:`scales_from_clip`).
- **Clip.** A coordinate is clipped to ``[-levels * scale, levels * scale]`` of its block: the
  L-infinity clip the aggregator sets, which bounds every coordinate of every update and is one
  of the few screenings left when updates are hidden. :func:`quantise` counts the clipped
  coordinates so the site can report (and the coordinator can tune) how often it bites.
- **Stochastic rounding.** ``q = floor(x / scale + u)``, ``u`` uniform in [0, 1), is unbiased
  (E[q * scale] = x). The noise comes from the ChaCha20 keystream of a 32-byte seed
  (:mod:`~fed_unimiss.secure_aggregation.prg`): it need not be secret, only independent of the
  data; tests pass an explicit seed. The arithmetic is float32 with 24-bit ``u`` (exact in
  float32): the rounding of ``x / scale + u`` biases q by at most half a float32 ulp of
  ``levels``, 2^-18 of a step for 127 levels, and error feedback carries even that.
- **Error feedback.** What the clip and the rounding lost (``x - q * scale``) is returned as the
  residual, kept at the site and added to its next update (Seide et al. 2014; Karimireddy et al.
  2019). It never travels.

**Weights: the site multiplies, the counts travel in the clear.** A masked vector cannot be
weighted after masking (w_u m_uv - w_v m_uv does not cancel), so the site multiplies its
integer levels by its integer weight before masking (:func:`to_ring`). The weights themselves
(one per part, below) travel in the clear next to the masked vector, because (1) the aggregator
needs the per-part weight sums to turn the sum into a mean, (2) the count bounds are a
screening that must survive secure mode, and they need each site's counts, (3) the overflow
bound needs each site's weight to be at most ``max_weight``, which the aggregator must check
before it adds a vector, and (4) sample counts are already public in the plain exchange and in
rounds.jsonl. What this reveals is how much data a site trained on, not what it learnt. A site
whose weight is larger than ``max_weight`` must divide its counts by the announced
``weight_unit`` (:func:`part_weights`); coarser weights change FedAvg's weighting slightly,
never the sum's exactness.

**Dimension-aware.** The flat vector is a concatenation of tensors, each of one part, ``2d``,
``3d`` or ``shared`` (:func:`fed_unimiss.exchange.classify_exchange_keys`); ``layout`` lists
(size, part) in the flat order. A site's weight for a part is its count for that part
(:func:`fed_unimiss.exchange.class_weight`): a site with no 3D data has weight 0 for ``3d``, so
it adds exactly 0 there (its masks still cover the whole vector), and the mean of each part is
its sum divided by that part's weight sum.

**The ring's width.** With N sites, weights at most W and levels at most L, every coordinate of
the true sum lies in [-N W L, N W L], so k bits suffice when N W L < 2^(k-1): the sum read as a
signed k-bit integer is then the true sum exactly. :class:`RingPlan` refuses any plan that could
overflow (a ``ValueError`` naming the numbers); :func:`smallest_bits` gives the narrowest ring.
On the wire a coordinate takes ceil(k/8) bytes (:func:`pack`): k = 16 is 0.5x the fp32 bytes.

Pure numpy/torch, no flwr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fed_unimiss.exchange import class_weight
from fed_unimiss.secure_aggregation.prg import keystream_chunks

__all__ = ["PARTS", "RingPlan", "Quantised", "plan_ring", "smallest_bits", "ring_dtype", "scales_from_clip",
           "layout_from_classes", "part_weights", "quantise", "to_ring", "add_into",
           "signed_sum", "mean_update", "pack", "unpack"]

PARTS = ("2d", "3d", "shared")  # the tensor classes of fed_unimiss.models.classify
_CHUNK = 1 << 20  # coordinates per step of quantise: bounds its float temporaries


def ring_dtype(bits: int) -> np.dtype:
    """The smallest little-endian unsigned numpy dtype holding ``bits`` bits."""
    for size in (1, 2, 4, 8):
        if bits <= 8 * size:
            return np.dtype(f"<u{size}")
    raise ValueError(f"bits: {bits} exceeds 64")


def smallest_bits(n_sites: int, max_weight: int, levels: int, whole_bytes: bool = True) -> int:
    """The smallest k with n_sites * max_weight * levels < 2^(k-1) (a multiple of 8 if asked)."""
    bound = n_sites * max_weight * levels
    bits = max(2, bound.bit_length() + 1)
    return 8 * math.ceil(bits / 8) if whole_bytes else bits


@dataclass(frozen=True)
class RingPlan:
    """What every site of a round quantises with, announced by the aggregator before the round.

    ``scales`` has one float32 per block of ``block`` coordinates of the flat vector (the last
    block may be short); ``layout`` is (size, part) per tensor in the flat order. The overflow
    bound ``n_sites * max_weight * levels < 2^(bits-1)`` is checked on construction.
    """

    bits: int  # k: the ring is the integers mod 2^k; 16 -> 2 bytes a coordinate on the wire
    levels: int  # L: a quantised coordinate lies in [-L, L]; more levels, less rounding noise
    max_weight: int  # W: the largest weight a site may apply (counts / weight_unit)
    n_sites: int  # N: the most vectors that are ever summed (the round's sites)
    block: int  # coordinates per scale
    scales: np.ndarray  # float32, one per block: the quantisation step of that block
    layout: tuple[tuple[int, str], ...]  # (size, part) per tensor, in the flat order
    weight_unit: int = 1  # samples per unit of weight: a site's weight is round(count / unit)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", np.ascontiguousarray(self.scales, dtype=np.float32))
        object.__setattr__(self, "layout", tuple((int(s), str(p)) for s, p in self.layout))
        for name in ("bits", "levels", "max_weight", "n_sites", "block", "weight_unit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ring plan: {name} must be a positive integer, got {value!r}")
        if not 2 <= self.bits <= 62:
            raise ValueError(f"ring plan: bits must be in [2, 62], got {self.bits}")
        bound = self.n_sites * self.max_weight * self.levels
        if bound >= 2 ** (self.bits - 1):
            raise ValueError(
                f"ring plan could overflow: {self.n_sites} sites x max weight {self.max_weight} "
                f"x {self.levels} levels = {bound} >= 2^{self.bits - 1} = {2 ** (self.bits - 1)}; "
                f"use at least {smallest_bits(self.n_sites, self.max_weight, self.levels, False)} "
                f"bits, fewer levels, or a larger weight_unit")
        bad = [p for _, p in self.layout if p not in PARTS]
        if bad:
            raise ValueError(f"ring plan: unknown part {bad[0]!r}; expected one of {PARTS}")
        if self.size == 0:
            raise ValueError("ring plan: the layout is empty")
        blocks = math.ceil(self.size / self.block)
        if self.scales.shape != (blocks,):
            raise ValueError(f"ring plan: {self.scales.size} scales for {blocks} blocks of "
                             f"{self.block} ({self.size} coordinates)")
        if not (np.isfinite(self.scales).all() and (self.scales > 0).all()):
            raise ValueError("ring plan: every scale must be finite and positive")

    @property
    def size(self) -> int:
        return sum(s for s, _ in self.layout)

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.bits)

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def byte_width(self) -> int:
        """Bytes per coordinate on the wire (:func:`pack`)."""
        return math.ceil(self.bits / 8)

    def to_dict(self) -> dict[str, object]:
        """Plain data for a config/array record (:meth:`from_dict` inverts it)."""
        return {"bits": self.bits, "levels": self.levels, "max_weight": self.max_weight,
                "n_sites": self.n_sites, "block": self.block, "weight_unit": self.weight_unit,
                "scales": self.scales.copy(), "layout": [[s, p] for s, p in self.layout]}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RingPlan:
        return cls(bits=int(data["bits"]), levels=int(data["levels"]),
                   max_weight=int(data["max_weight"]), n_sites=int(data["n_sites"]),
                   block=int(data["block"]), weight_unit=int(data.get("weight_unit", 1)),
                   scales=np.asarray(data["scales"], dtype=np.float32),
                   layout=tuple((int(s), str(p)) for s, p in data["layout"]))


def plan_ring(layout: Sequence[tuple[int, str]], n_sites: int, max_count: int,
              clip: float | np.ndarray, bits: int = 16, levels: int = 15, block: int = 256
              ) -> RingPlan:
    """The aggregator's ring for a round: ``bits`` and ``levels`` fixed, the weights fitted.

    ``max_count`` is the count bound (the most samples a site may report for one part, e.g.
    2D + 3D for ``shared``); the weight unit is chosen so that ``max_count`` maps to the largest
    weight the overflow bound allows. Raises ``ValueError`` when even weight 1 cannot fit.
    """
    max_weight = (2 ** (bits - 1) - 1) // (n_sites * levels)
    if max_weight < 1:
        raise ValueError(f"{n_sites} sites x {levels} levels do not fit a {bits}-bit ring even "
                         f"with weight 1; use more bits or fewer levels")
    unit = max(1, math.ceil(max_count / max_weight))
    size = sum(s for s, _ in layout)
    return RingPlan(bits=bits, levels=levels, max_weight=max_weight, n_sites=n_sites,
                    block=block, scales=scales_from_clip(clip, size, block, levels),
                    layout=tuple(layout), weight_unit=unit)


def layout_from_classes(items: Iterable[tuple[str, Sequence[int]]], classes: Mapping[str, str]
                        ) -> tuple[tuple[int, str], ...]:
    """(size, part) per tensor of a packing layout (name, shape), parts from ``classes``."""
    return tuple((math.prod(shape), classes[name]) for name, shape in items)


def scales_from_clip(clip: float | np.ndarray, size: int, block: int, levels: int) -> np.ndarray:
    """One scale per block so that ``levels`` steps reach ``clip`` (a float, or one per block).

    The aggregator's choice: e.g. a multiple of last round's largest aggregate change per
    block, or a fixed bound. Every coordinate beyond ``clip`` is clipped at the site.
    """
    blocks = math.ceil(size / block)
    clip_arr = np.broadcast_to(np.asarray(clip, dtype=np.float64), (blocks,))
    if not (np.isfinite(clip_arr).all() and (clip_arr > 0).all()):
        raise ValueError("clip bounds must be finite and positive")
    return (clip_arr / levels).astype(np.float32)


def part_weights(samples_2d: int, samples_3d: int, plan: RingPlan) -> dict[str, int]:
    """A site's integer weight per part: its count for the part, in units of ``weight_unit``.

    A positive count never rounds to weight 0 (the site would silently not count); a count
    whose weight exceeds ``max_weight`` raises ``ValueError`` (the site should not train on
    more than the count bounds announce).
    """
    out = {}
    for part in PARTS:
        count = int(class_weight(part, samples_2d, samples_3d))
        weight = 0 if count <= 0 else max(1, round(count / plan.weight_unit))
        if weight > plan.max_weight:
            raise ValueError(f"{part} weight {weight} ({count} samples / unit "
                             f"{plan.weight_unit}) exceeds the plan's max_weight "
                             f"{plan.max_weight}")
        out[part] = weight
    return out


@dataclass
class Quantised:
    """A site's update in levels: ``values`` (int32, in [-L, L]), what it lost, how much clipped."""

    values: torch.Tensor  # int32, the plan's size
    residual: torch.Tensor  # float32: x - values * scale, to add to the next update
    clipped: int  # coordinates beyond the clip bound (after adding the old residual)


def _block_scales(plan: RingPlan, start: int, stop: int) -> torch.Tensor:
    """The scale of every coordinate in [start, stop)."""
    idx = torch.arange(start, stop, dtype=torch.int64).div_(plan.block, rounding_mode="floor")
    return torch.from_numpy(plan.scales)[idx]


def quantise(update: torch.Tensor, plan: RingPlan, *, seed: bytes,
             residual: torch.Tensor | None = None) -> Quantised:
    """Clip and stochastically round ``update`` (+ ``residual``) to the plan's levels.

    ``seed`` (32 bytes, e.g. ``secrets.token_bytes(32)``) draws the rounding noise. Works in
    chunks, so the float temporaries stay small whatever the state's size.
    """
    flat = update.detach().reshape(-1).to(torch.float32)
    if flat.numel() != plan.size:
        raise ValueError(f"update has {flat.numel()} values, the plan {plan.size}")
    if residual is not None and residual.numel() != plan.size:
        raise ValueError(f"residual has {residual.numel()} values, the plan {plan.size}")
    values = torch.empty(plan.size, dtype=torch.int32)
    new_residual = torch.empty(plan.size, dtype=torch.float32)
    clipped = 0
    chunk = plan.block * max(1, _CHUNK // plan.block)  # whole blocks per step
    noise = keystream_chunks(seed, 4 * plan.size, "rounding", chunk=4 * chunk)
    scales = torch.from_numpy(plan.scales)
    for start in range(0, plan.size, chunk):
        stop = min(start + chunk, plan.size)
        x = flat[start:stop].clone()
        if residual is not None:
            x.add_(residual.reshape(-1)[start:stop])
        first = start // plan.block
        scale = scales[first:first + chunk // plan.block].repeat_interleave(plan.block)
        scale = scale[:stop - start]
        t = x / scale  # in levels
        clipped += int(t.abs().gt_(plan.levels).sum())
        t.clamp_(-plan.levels, plan.levels)  # the L-infinity clip
        top = np.frombuffer(next(noise), dtype="<u4") >> np.uint32(8)  # 24 bits: exact in fp32
        t.add_(torch.from_numpy(top.astype(np.float32)), alpha=2.0 ** -24).floor_()
        t.clamp_(-plan.levels, plan.levels)  # float rounding at the very edge
        values[start:stop] = t.to(torch.int32)
        new_residual[start:stop] = x.sub_(t.mul_(scale))
    return Quantised(values=values, residual=new_residual, clipped=clipped)


def to_ring(values: torch.Tensor, plan: RingPlan, weights: Mapping[str, int]) -> np.ndarray:
    """``values`` times the site's weight of each part, mod 2^k (the plan's dtype).

    ``weights`` has one integer in [0, max_weight] per part of the layout (:func:`part_weights`).
    """
    for part in {p for _, p in plan.layout}:
        w = weights.get(part)
        if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= plan.max_weight:
            raise ValueError(f"weight of part {part!r} must be an integer in "
                             f"[0, {plan.max_weight}], got {w!r}")
    v = values.reshape(-1).numpy()
    if v.size != plan.size:
        raise ValueError(f"{v.size} values, the plan has {plan.size}")
    if v.size and max(int(v.max()), -int(v.min())) > plan.levels:
        raise ValueError(f"a value exceeds the plan's {plan.levels} levels")
    # In the ring's own unsigned dtype: casting a negative level wraps it mod 2^(8 itemsize),
    # and so does the product; 2^k divides that modulus, so masking to k bits afterwards gives
    # the value mod 2^k. No int64 temporaries: 2 bytes a coordinate for a 16-bit ring.
    out = v.astype(plan.dtype)
    start = 0
    for size, part in plan.layout:
        seg = out[start:start + size]
        np.multiply(seg, plan.dtype.type(weights[part]), out=seg)
        start += size
    if plan.bits < 8 * plan.dtype.itemsize:
        np.bitwise_and(out, plan.dtype.type(plan.mask), out=out)
    return out


def add_into(total: np.ndarray, vector: np.ndarray, plan: RingPlan, sign: int = 1) -> None:
    """``total += sign * vector`` mod 2^k, in place (both of the plan's dtype and size)."""
    if vector.dtype != plan.dtype or vector.shape != (plan.size,):
        raise ValueError(f"expected {plan.dtype} of shape ({plan.size},), got {vector.dtype} "
                         f"{vector.shape}")
    if sign > 0:
        np.add(total, vector, out=total)
    else:
        np.subtract(total, vector, out=total)
    if plan.bits < 8 * plan.dtype.itemsize:  # the dtype wraps at 2^(8 itemsize); 2^k divides it
        np.bitwise_and(total, plan.dtype.type(plan.mask), out=total)


def signed_sum(total: np.ndarray, plan: RingPlan) -> np.ndarray:
    """The ring sum as signed int64: exact while the plan's overflow bound holds."""
    s = total.astype(np.int64) & np.int64(plan.mask)
    s[s >= (1 << (plan.bits - 1))] -= np.int64(1 << plan.bits)
    return s


def mean_update(total: np.ndarray, plan: RingPlan, weight_sums: Mapping[str, int]
                ) -> torch.Tensor:
    """The weighted mean update (float32, flat) of an unmasked ring sum.

    Each part's sum is divided by that part's weight sum; a part no site weighted stays 0 (the
    global tensors keep their value, as in the plain weighted mean).
    """
    levels = torch.from_numpy(signed_sum(total, plan))
    out = torch.zeros(plan.size, dtype=torch.float32)
    start = 0
    for size, part in plan.layout:
        w = int(weight_sums.get(part, 0))
        if w > 0:
            scale = _block_scales(plan, start, start + size).to(torch.float64)
            out[start:start + size] = (levels[start:start + size].to(torch.float64)
                                       * scale / w).to(torch.float32)
        start += size
    return out


def pack(vector: np.ndarray, plan: RingPlan) -> bytes:
    """A ring vector as ceil(k/8) little-endian bytes per coordinate (k = 24: 3 bytes)."""
    if vector.dtype != plan.dtype or vector.shape != (plan.size,):
        raise ValueError(f"expected {plan.dtype} of shape ({plan.size},), got {vector.dtype} "
                         f"{vector.shape}")
    width = plan.byte_width
    if width == plan.dtype.itemsize:
        return vector.tobytes()
    return vector.view(np.uint8).reshape(-1, plan.dtype.itemsize)[:, :width].tobytes()


def unpack(data: bytes, plan: RingPlan) -> np.ndarray:
    """The ring vector of :func:`pack`; ``ValueError`` if the length or a value is wrong."""
    width = plan.byte_width
    if len(data) != width * plan.size:
        raise ValueError(f"{len(data)} bytes, expected {width} x {plan.size}")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    if width == plan.dtype.itemsize:
        out = raw.reshape(-1).view(plan.dtype).copy()
    else:
        wide = np.zeros((plan.size, plan.dtype.itemsize), dtype=np.uint8)
        wide[:, :width] = raw
        out = wide.reshape(-1).view(plan.dtype)
    if plan.bits < 8 * plan.dtype.itemsize and (out > plan.mask).any():
        raise ValueError(f"a value exceeds the {plan.bits}-bit ring")
    return out
