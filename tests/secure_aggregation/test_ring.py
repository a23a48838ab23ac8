"""Quantisation into the ring: overflow bound, clip, unbiased rounding, error feedback, wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from secagg_helpers import make_ring

from fed_unimiss.secure_aggregation.ring import (
    RingPlan,
    add_into,
    pack,
    part_weights,
    quantise,
    scales_from_clip,
    signed_sum,
    smallest_bits,
    to_ring,
    unpack,
)


def test_a_plan_that_could_overflow_is_refused_naming_the_numbers():
    with pytest.raises(ValueError, match=r"8 sites x max weight 300 x 15 levels = 36000 >= "
                                         r"2\^15 = 32768; use at least 17 bits"):
        make_ring(8, levels=15, max_weight=300, bits=16)
    make_ring(8, levels=15, max_weight=273, bits=16)  # 32760 < 32768: fits


def test_smallest_bits_is_the_bound():
    assert smallest_bits(8, 273, 15, whole_bytes=False) == 16
    assert smallest_bits(8, 274, 15, whole_bytes=False) == 17
    assert smallest_bits(8, 274, 15) == 24
    assert smallest_bits(32, 1000, 127, whole_bytes=False) == 23


def test_the_ring_holds_the_extreme_sum_exactly():
    """N sites at the max weight and +-L levels: the signed sum is exact at both ends."""
    ring = make_ring(5, layout=((4, "shared"),), levels=7, max_weight=3, bits=8)  # 105 < 128
    total = np.zeros(4, dtype=ring.dtype)
    for _ in range(5):
        add_into(total, to_ring(torch.tensor([7, -7, 0, 1], dtype=torch.int32), ring,
                                {"2d": 0, "3d": 0, "shared": 3}), ring)
    assert signed_sum(total, ring).tolist() == [105, -105, 0, 15]


def test_weights_outside_the_plan_are_refused():
    ring = make_ring(3, max_weight=10)
    q = torch.zeros(ring.size, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"weight of part '3d' must be an integer in \[0, 10\]"):
        to_ring(q, ring, {"2d": 1, "3d": 11, "shared": 1})
    with pytest.raises(ValueError, match="exceeds the plan's max_weight 10"):
        part_weights(5, 11, ring)


def test_part_weights_follow_the_dimensions_and_the_unit():
    ring = RingPlan(bits=32, levels=127, max_weight=1000, n_sites=4, block=8,
                    scales=scales_from_clip(1.0, 16, 8, 127), layout=((16, "shared"),),
                    weight_unit=10)
    assert part_weights(120, 0, ring) == {"2d": 12, "3d": 0, "shared": 12}
    assert part_weights(3, 2, ring) == {"2d": 1, "3d": 1, "shared": 1}  # never 0 for a count


def test_the_clip_is_counted_and_bounds_every_level():
    ring = make_ring(3, layout=((1000, "shared"),), levels=10, clip=1.0, block=100)
    x = torch.linspace(-3, 3, 1000)
    out = quantise(x, ring, seed=bytes(32))
    assert out.clipped == int((x.abs() > 1.0).sum())
    assert int(out.values.abs().max()) == 10
    # what the clip cut off is carried, with the rounding error, in the residual
    torch.testing.assert_close(out.values.float() * 0.1 + out.residual, x, rtol=0, atol=1e-6)


def test_stochastic_rounding_is_unbiased():
    ring = make_ring(3, layout=((50_000, "shared"),), levels=127, clip=1.27, block=1000)
    x = torch.full((50_000,), 0.0137)  # 0.137 of a step of 0.01 above a level
    mean = quantise(x, ring, seed=b"\x01" * 32).values.double().mean() * 0.01
    # each draw's error is within one step; the mean of 50 000 within 5 standard errors
    assert abs(float(mean) - 0.0137) < 5 * 0.01 * 0.5 / 50_000 ** 0.5
    other = quantise(x, ring, seed=b"\x02" * 32).values
    assert not torch.equal(other, quantise(x, ring, seed=b"\x01" * 32).values)
    assert torch.equal(quantise(x, ring, seed=b"\x01" * 32).values,
                       quantise(x, ring, seed=b"\x01" * 32).values)  # explicit seed: repeatable


def test_error_feedback_carries_the_residual():
    """Over rounds, what was sent plus what is carried is what was meant, to float precision."""
    ring = make_ring(3, layout=((4096, "shared"),), levels=3, clip=0.3, block=512)
    gen = torch.Generator().manual_seed(0)
    residual, sent, meant = None, torch.zeros(4096), torch.zeros(4096)
    for r in range(5):
        update = torch.randn(4096, generator=gen) * 0.05
        out = quantise(update, ring, seed=bytes([r]) * 32, residual=residual)
        sent += out.values.float() * 0.1
        meant += update
        residual = out.residual
    torch.testing.assert_close(sent + residual, meant, rtol=0, atol=1e-5)
    assert float(residual.abs().max()) < 0.1 + 1e-6  # within one step: nothing piles up


@pytest.mark.parametrize("bits", [12, 16, 24, 32])
def test_pack_round_trips_in_whole_bytes(bits):
    ring = make_ring(2, layout=((1000, "shared"),), levels=3, max_weight=2, bits=bits)
    v = to_ring(torch.randint(-3, 4, (1000,), dtype=torch.int32), ring,
                {"2d": 0, "3d": 0, "shared": 2})
    data = pack(v, ring)
    assert len(data) == 1000 * ((bits + 7) // 8)
    assert np.array_equal(unpack(data, ring), v)


def test_a_plan_round_trips_as_plain_data():
    ring = make_ring(3)
    again = RingPlan.from_dict(ring.to_dict())
    assert again.layout == ring.layout and np.array_equal(again.scales, ring.scales)
    assert (again.bits, again.levels, again.max_weight) == (ring.bits, ring.levels,
                                                            ring.max_weight)


def test_plan_ring_fits_the_count_bound_into_the_weights():
    from fed_unimiss.secure_aggregation.ring import plan_ring

    ring = plan_ring(((1000, "2d"), (24, "shared")), n_sites=8, max_count=5000, clip=0.05)
    assert (ring.bits, ring.levels, ring.max_weight) == (16, 15, 273)  # 8 x 273 x 15 < 2^15
    assert ring.weight_unit == 19  # ceil(5000 / 273)
    assert part_weights(2500, 2500, ring)["shared"] <= ring.max_weight
    with pytest.raises(ValueError, match="do not fit a 8-bit ring even with weight 1"):
        plan_ring(((10, "2d"),), n_sites=32, max_count=10, clip=1.0, bits=8)
