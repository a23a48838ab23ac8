"""The four stages end to end with real crypto: exact sums, dropouts, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from secagg_helpers import SiteInput, make_plan, plain_sum, run_round, site_inputs

from fed_unimiss.secure_aggregation import (
    AggregatorParty,
    ProtocolError,
    RevealRefused,
    SiteParty,
    TooFewSurvivors,
)
from fed_unimiss.secure_aggregation.ring import PARTS, part_weights, quantise, to_ring


def _mixed_counts(sites):
    """Alternate CT sites (2D slices and 3D volumes) and X-ray-only sites (no 3D)."""
    return {s: ((40 + 7 * i, 10 + i) if i % 2 == 0 else (60 + 3 * i, 0))
            for i, s in enumerate(sites)}


@pytest.mark.parametrize("n_sites", [3, 8])
def test_the_unmasked_sum_is_the_plain_integer_sum(n_sites, identities, roster):
    plan = make_plan(n_sites)
    counts = _mixed_counts(plan.sites)
    inputs = site_inputs(plan, counts)
    r = run_round(plan, identities, roster, inputs)
    assert np.array_equal(r.result.levels(), plain_sum(plan, inputs, plan.sites))
    assert r.result.survivors == plan.sites
    assert r.result.dropped_before_upload == () and r.result.silent_at_unmask == ()


def test_a_site_without_3d_data_adds_nothing_to_3d_parts(identities, roster):
    plan = make_plan(3)
    counts = _mixed_counts(plan.sites)  # site-b has no 3D samples
    inputs = site_inputs(plan, counts)
    assert inputs["site-b"].weights["3d"] == 0
    r = run_round(plan, identities, roster, inputs)
    three_d = slice(300, 800)  # MIXED_LAYOUT's 3D tensor
    assert bool((inputs["site-b"].levels[three_d] != 0).any())  # it had a 3D update...
    assert np.array_equal(r.result.levels()[three_d],
                          plain_sum(plan, inputs, ["site-a", "site-c"])[three_d])  # ...unused
    assert r.result.weight_sums == {
        p: sum(inputs[s].weights[p] for s in plan.sites) for p in PARTS}


def test_the_mean_is_the_weighted_mean_of_each_part(identities, roster):
    plan = make_plan(3)
    counts = _mixed_counts(plan.sites)
    inputs = site_inputs(plan, counts)
    mean = run_round(plan, identities, roster, inputs).result.mean()
    scale = torch.from_numpy(plan.ring.scales).repeat_interleave(plan.ring.block)[:plan.ring.size]
    start = 0
    for size, part in plan.ring.layout:
        sl = slice(start, start + size)
        w = {s: inputs[s].weights[part] for s in plan.sites}
        expected = sum(w[s] * inputs[s].levels[sl].double() * scale[sl].double()
                       for s in plan.sites) / sum(w.values())
        torch.testing.assert_close(mean[sl].double(), expected, rtol=1e-6, atol=1e-7)
        start += size


@pytest.mark.parametrize("n_sites, before, after", [(3, ["site-b"], []), (3, [], ["site-c"]),
                                                     (8, ["site-b"], ["site-h"])])
def test_a_drop_before_upload_and_one_after(n_sites, before, after, identities, roster):
    """3 sites with threshold 2 survive one drop; 8 sites with threshold 5 survive both."""
    plan = make_plan(n_sites, threshold=2 if n_sites == 3 else 5)
    inputs = site_inputs(plan, _mixed_counts(plan.sites), seed=1)
    r = run_round(plan, identities, roster, inputs, drop_before=before, drop_after=after)
    kept = [s for s in plan.sites if s not in before]
    assert r.result.survivors == tuple(kept)
    assert r.result.dropped_before_upload == tuple(before)
    assert r.result.silent_at_unmask == tuple(after)
    assert np.array_equal(r.result.levels(), plain_sum(plan, inputs, kept))
    assert r.result.weight_sums["3d"] == sum(inputs[s].weights["3d"] for s in kept)


def test_a_drop_of_a_site_that_no_peer_sorts_before(identities, roster):
    """Pair signs from both sides: the first and the last site drop before upload."""
    plan = make_plan(8, threshold=5)
    inputs = site_inputs(plan, _mixed_counts(plan.sites), seed=2)
    r = run_round(plan, identities, roster, inputs, drop_before=[plan.sites[0], plan.sites[-1]])
    assert np.array_equal(r.result.levels(), plain_sum(plan, inputs, plan.sites[1:-1]))


def test_fewer_survivors_than_the_threshold_fail_the_round(identities, roster):
    plan = make_plan(3, threshold=2)
    inputs = site_inputs(plan, _mixed_counts(plan.sites))
    with pytest.raises(TooFewSurvivors, match="stage 'masked_input': 1 site.*threshold is 2"):
        run_round(plan, identities, roster, inputs, drop_before=plan.sites[:2])
    with pytest.raises(TooFewSurvivors, match="stage 'unmask'") as e:
        run_round(plan, identities, roster, inputs, drop_after=plan.sites[:2])
    assert (e.value.have, e.value.need) == (1, 2)
    agg = AggregatorParty(plan)
    agg.receive_advert("site-a", SiteParty(plan, "site-a", identities["site-a"],
                                           roster).advertise())
    with pytest.raises(TooFewSurvivors, match="stage 'advertise'"):
        agg.adverts()


def _to_unmask(plan, identities, roster, inputs=None, upload=None):
    """A round driven up to its unmasking stage; only the sites in ``upload`` (default: all)
    send their masked input, the others drop before upload."""
    inputs = inputs or site_inputs(plan, _mixed_counts(plan.sites))
    parties = {s: SiteParty(plan, s, identities[s], roster) for s in plan.sites}
    agg = AggregatorParty(plan)
    for s, p in parties.items():
        agg.receive_advert(s, p.advertise())
    adverts = agg.adverts()
    for s in plan.sites:
        agg.receive_shares(s, parties[s].share_keys(adverts))
    for s, inbox in agg.inboxes().items():
        if upload is None or s in upload:
            agg.receive_masked(s, parties[s].masked_input(inbox, inputs[s].ring),
                               inputs[s].weights)
    return parties, agg


def test_a_site_never_reveals_both_shares_of_one_peer(identities, roster):
    plan = make_plan(3, threshold=2)
    parties, agg = _to_unmask(plan, identities, roster)
    a = parties["site-a"]
    first = a.unmask(agg.survivors())  # site-c survived: a reveals c's self-mask share
    assert "site-c" in first["self_mask"] and first["mask_key"] == {}
    with pytest.raises(RevealRefused, match="mask_key share of site 'site-c'") as e:
        a.unmask(["site-a", "site-b"])  # now the aggregator claims c dropped before upload
    assert e.value.peer == "site-c"


def test_a_site_refuses_survivor_lists_it_cannot_trust(identities, roster):
    plan = make_plan(3, threshold=2)
    parties, agg = _to_unmask(plan, identities, roster)
    with pytest.raises(ProtocolError, match="not among the survivors"):
        parties["site-a"].unmask(["site-b", "site-c"])
    with pytest.raises(TooFewSurvivors):
        parties["site-a"].unmask(["site-a"])


def test_a_bad_share_is_caught_when_a_dropped_key_is_rebuilt(identities, roster):
    plan = make_plan(3, threshold=2)
    parties, agg = _to_unmask(plan, identities, roster, upload=("site-a", "site-b"))  # c drops
    survivors = agg.survivors()
    reveal = parties["site-a"].unmask(survivors)
    reveal["mask_key"]["site-c"] = bytes(32)  # a corrupted share
    agg.receive_unmask("site-a", reveal)
    agg.receive_unmask("site-b", parties["site-b"].unmask(survivors))
    with pytest.raises(ProtocolError, match="site 'site-c': the mask_key secret rebuilt from 2 "
                                            "shares does not match what the site signed"):
        agg.finish()


def _reveal_all(plan, identities, roster, inputs, corrupt: tuple[str, str], answer):
    """A round without drops in which survivor ``corrupt[0]`` reveals a bad self-mask share
    of ``corrupt[1]``; only the sites in ``answer`` reveal."""
    parties, agg = _to_unmask(plan, identities, roster, inputs)
    survivors = agg.survivors()
    for s in answer:
        reveal = parties[s].unmask(survivors)
        if s == corrupt[0]:
            reveal["self_mask"][corrupt[1]] = bytes(32)
        agg.receive_unmask(s, reveal)
    return agg


def test_one_bad_self_mask_share_is_outvoted_by_spare_shares(identities, roster):
    plan = make_plan(8, threshold=5)
    inputs = site_inputs(plan, _mixed_counts(plan.sites), seed=4)
    agg = _reveal_all(plan, identities, roster, inputs, ("site-a", "site-d"), plan.sites)
    assert np.array_equal(agg.finish().levels(), plain_sum(plan, inputs, plan.sites))


def test_a_bad_self_mask_share_without_spares_is_caught_naming_its_owner(identities, roster):
    plan = make_plan(8, threshold=5)
    inputs = site_inputs(plan, _mixed_counts(plan.sites), seed=4)
    agg = _reveal_all(plan, identities, roster, inputs, ("site-a", "site-d"), plan.sites[:5])
    with pytest.raises(ProtocolError, match="site 'site-d': the self_mask secret rebuilt from 5"):
        agg.finish()


def test_a_site_reveals_only_shares_of_the_kind_the_survivor_list_implies(identities, roster):
    plan = make_plan(3, threshold=2)
    parties, agg = _to_unmask(plan, identities, roster)
    survivors = agg.survivors()
    reveal = parties["site-a"].unmask(survivors)
    reveal["mask_key"]["site-b"] = reveal["self_mask"].pop("site-b")
    with pytest.raises(ProtocolError, match="site 'site-a': shares of the wrong kind"):
        agg.receive_unmask("site-a", reveal)


def test_the_aggregator_refuses_out_of_bound_counts_and_strangers(identities, roster):
    plan = make_plan(3, threshold=2)
    parties = {s: SiteParty(plan, s, identities[s], roster) for s in plan.sites}
    agg = AggregatorParty(plan)
    with pytest.raises(ProtocolError, match="site 'site-z': not a site of this round"):
        agg.receive_advert("site-z", parties["site-a"].advertise())
    for s, p in parties.items():
        if s != "site-a":
            agg.receive_advert(s, p.advertise())
    adverts = agg.adverts()
    for s in adverts:
        agg.receive_shares(s, parties[s].share_keys(adverts))
    inboxes = agg.inboxes()
    vec = np.zeros(plan.ring.size, dtype=plan.ring.dtype)
    masked = parties["site-b"].masked_input(inboxes["site-b"], vec)
    with pytest.raises(ProtocolError, match="3d weight 101 is outside"):
        agg.receive_masked("site-b", masked, {"2d": 1, "3d": 101, "shared": 1})
    with pytest.raises(ProtocolError, match="site 'site-a': masked input from a site that"):
        agg.receive_masked("site-a", masked, {"2d": 1, "3d": 1, "shared": 1})


def test_a_round_the_size_of_the_micro_state(identities, roster):
    """7.3 M coordinates (student + teacher + center of the micro preset): the chunked
    quantisation and masking give the exact sum across chunk boundaries."""
    size = 7_335_936 + 1024
    layout = ((3_000_000, "2d"), (2_000_000, "3d"), (size - 5_000_000, "shared"))
    plan = make_plan(3, threshold=2, layout=layout, levels=15, max_weight=500, block=256)
    gen = torch.Generator().manual_seed(3)
    counts = {"site-a": (400, 100), "site-b": (300, 0), "site-c": (200, 50)}
    inputs = {}
    for i, s in enumerate(plan.sites):
        q = (quantise(torch.randn(size, generator=gen) * 0.1, plan.ring, seed=bytes([i]) * 32)
             .values if i == 0 else torch.randint(-15, 16, (size,), generator=gen,
                                                  dtype=torch.int32))
        w = part_weights(*counts[s], plan.ring)
        inputs[s] = SiteInput(q, w, to_ring(q, plan.ring, w))
    r = run_round(plan, identities, roster, inputs, drop_before=["site-b"])
    assert np.array_equal(r.result.levels(), plain_sum(plan, inputs, ["site-a", "site-c"]))
