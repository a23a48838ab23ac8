"""What the aggregator sees of one site is independent of that site's update.

The masked vector of a site is its ring vector plus a self mask (ChaCha20 of a fresh 256-bit
seed) plus pairwise masks, so on its own it is uniform in the ring whatever the update. These
tests look for any trace with the statistics that find it in the unmasked vector at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from secagg_helpers import make_plan, run_round, site_inputs

from fed_unimiss.secure_aggregation.ring import to_ring

N = 40_000
LAYOUT = ((N, "shared"),)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), grid, side="right") / a.size
    fb = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


def _signed(v: np.ndarray, bits: int) -> np.ndarray:
    s = v.astype(np.int64)
    return np.where(s >= 2 ** (bits - 1), s - 2 ** bits, s)


def _masked_of_site_a(identities, roster, levels: torch.Tensor):
    plan = make_plan(3, layout=LAYOUT, levels=127, max_weight=80)
    inputs = site_inputs(plan, {s: (50, 30) for s in plan.sites})
    a = inputs["site-a"]
    a.levels = levels
    a.ring = to_ring(levels, plan.ring, a.weights)
    return plan, a.ring, run_round(plan, identities, roster, inputs).masked["site-a"]


def test_a_masked_vector_is_uncorrelated_with_its_update(identities, roster):
    i = torch.arange(N, dtype=torch.float64)
    x1 = (127 * torch.sin(i / 40)).round().to(torch.int32)  # a strong, smooth update
    x2 = torch.where(i % 3 == 0, 127, -90).to(torch.int32)  # a very different one
    plan, ring1, masked1 = _masked_of_site_a(identities, roster, x1)
    _, ring2, masked2 = _masked_of_site_a(identities, roster, x2)
    bits, chance = plan.ring.bits, 4 / math.sqrt(N)
    # the statistic sees the update in the unmasked ring vector at once...
    assert _corr(_signed(ring1, bits), x1.numpy()) > 0.99
    assert _ks(_signed(ring1, bits), _signed(ring2, bits)) > 0.2
    # ...and nothing in the masked one, read as unsigned or as signed ring values
    for masked in (masked1, masked2):
        for x in (x1, x2):
            assert abs(_corr(masked, x.numpy())) < chance
            assert abs(_corr(_signed(masked, bits), x.numpy())) < chance


def test_two_different_updates_give_masked_vectors_that_cannot_be_told_apart(identities, roster):
    i = torch.arange(N)
    _, _, masked1 = _masked_of_site_a(identities, roster, torch.zeros(N, dtype=torch.int32))
    plan, _, masked2 = _masked_of_site_a(identities, roster,
                                         torch.where(i % 2 == 0, 127, -127).to(torch.int32))
    # KS critical value at alpha = 1e-4 for two samples of N: 2.23 sqrt(2 / N)
    assert _ks(masked1, masked2) < 2.23 * math.sqrt(2 / N)
    # both are uniform in the ring: the same mean and spread as a uniform variable
    top = 2 ** plan.ring.bits
    for m in (masked1, masked2):
        assert abs(m.mean() - top / 2) < 5 * top / math.sqrt(12 * N)
        assert abs(m.std() - top / math.sqrt(12)) < 0.02 * top / math.sqrt(12)
