"""Helpers of the secure-aggregation tests: plans, site inputs, and a whole round."""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fed_unimiss.secure_aggregation import AggregateResult, AggregatorParty, RoundPlan, SiteParty
from fed_unimiss.secure_aggregation.plan import harary_order
from fed_unimiss.secure_aggregation.ring import (
    RingPlan,
    part_weights,
    quantise,
    scales_from_clip,
    smallest_bits,
    to_ring,
)

SITES = tuple(f"site-{c}" for c in string.ascii_lowercase[:12])
MIXED_LAYOUT = ((300, "2d"), (500, "3d"), (150, "shared"), (50, "2d"))


def make_ring(n_sites: int, layout=MIXED_LAYOUT, levels: int = 127, max_weight: int = 100,
              block: int = 64, clip: float = 0.5, bits: int | None = None) -> RingPlan:
    size = sum(s for s, _ in layout)
    return RingPlan(bits=bits or smallest_bits(n_sites, max_weight, levels), levels=levels,
                    max_weight=max_weight, n_sites=n_sites, block=block,
                    scales=scales_from_clip(clip, size, block, levels), layout=layout)


def make_plan(n_sites: int, threshold: int | None = None, round_id: str = "run-1/round-1",
              degree: int | None = None, order: tuple[str, ...] | None = None,
              **ring_kw) -> RoundPlan:
    """A plan for the first ``n_sites`` of SITES; ``degree`` gives each site that many
    neighbours on the circle ``order`` (default: a shuffled one), SecAgg+ style."""
    sites = SITES[:n_sites]
    group = n_sites if degree is None else degree + 1
    return RoundPlan(round_id=round_id, sites=sites, threshold=threshold or group // 2 + 1,
                     ring=make_ring(n_sites, **ring_kw), degree=degree,
                     order=(order or harary_order(sites)) if degree else ())


@dataclass
class SiteInput:
    levels: torch.Tensor  # int32 quantised update
    weights: dict[str, int]
    ring: np.ndarray


def site_inputs(plan: RoundPlan, counts: Mapping[str, tuple[int, int]], seed: int = 0
                ) -> dict[str, SiteInput]:
    """A random float update per site, quantised and weighted as a site would."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, site in enumerate(plan.sites):
        update = torch.randn(plan.ring.size, generator=gen) * 0.2
        q = quantise(update, plan.ring, seed=bytes([i]) * 32).values
        weights = part_weights(*counts[site], plan.ring)
        out[site] = SiteInput(q, weights, to_ring(q, plan.ring, weights))
    return out


def plain_sum(plan: RoundPlan, inputs: Mapping[str, SiteInput], sites: Iterable[str]
              ) -> np.ndarray:
    """sum over ``sites`` of weight(part) * levels, as int64: what unmasking must give."""
    total = np.zeros(plan.ring.size, dtype=np.int64)
    for site in sites:
        start = 0
        for size, part in plan.ring.layout:
            total[start:start + size] += (inputs[site].levels[start:start + size].numpy()
                                          .astype(np.int64) * inputs[site].weights[part])
            start += size
    return total


@dataclass
class Round:
    result: AggregateResult
    masked: dict[str, np.ndarray]
    parties: dict[str, SiteParty]
    aggregator: AggregatorParty


def run_round(plan: RoundPlan, identities, roster, inputs: Mapping[str, SiteInput],
              drop_before: Iterable[str] = (), drop_after: Iterable[str] = ()) -> Round:
    """One round with real crypto: sites in ``drop_before`` vanish after sharing keys,
    those in ``drop_after`` after uploading their masked input."""
    parties = {s: SiteParty(plan, s, identities[s], roster) for s in plan.sites}
    agg = AggregatorParty(plan, roster)
    for s, p in parties.items():
        agg.receive_advert(s, p.advertise())
    adverts = agg.adverts()
    for s in adverts:
        agg.receive_shares(s, parties[s].share_keys(adverts))
    inboxes = agg.inboxes()
    masked = {}
    for s, inbox in inboxes.items():
        if s in set(drop_before):
            continue
        masked[s] = parties[s].masked_input(inbox, inputs[s].ring)
        agg.receive_masked(s, masked[s], inputs[s].weights)
    survivors = agg.survivors()
    for s in survivors:
        if s not in set(drop_after):
            agg.receive_unmask(s, parties[s].unmask(survivors))
    return Round(agg.finish(), masked, parties, agg)
