"""SecAgg+ neighbour graphs: each site masks with, and shares its secrets with, k neighbours only.

The sum must stay exact with dropouts, a site's work must not grow with the number of sites, and
every refusal of the complete graph must hold inside a neighbourhood.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg_helpers import SITES, make_plan, make_ring, plain_sum, run_round, site_inputs

from fed_unimiss.secure_aggregation import RoundPlan, TooFewSurvivors
from fed_unimiss.secure_aggregation.wire import plan_from_config, plan_to_config


def _counts(sites):
    return {s: ((20 + 3 * i, 5 + i) if i % 3 else (50 + i, 0)) for i, s in enumerate(sites)}


def test_the_graph_is_regular_symmetric_and_connected():
    plan = make_plan(12, degree=4)
    seen, todo = set(), [plan.sites[0]]
    for site in plan.sites:
        near = plan.neighbours(site)
        assert len(near) == 4 and site not in near
        assert all(site in plan.neighbours(peer) for peer in near)
    while todo:  # connected: the aggregator learns only the sum of all survivors
        site = todo.pop()
        if site not in seen:
            seen.add(site)
            todo += sorted(plan.neighbours(site))
    assert seen == set(plan.sites)
    assert plan.threshold == 3  # a strict majority of a site and its 4 neighbours


def test_a_degree_of_every_other_site_is_the_complete_graph():
    plan = make_plan(5, degree=4)
    assert plan.degree is None and plan.order == ()
    assert plan.neighbours("site-a") == frozenset(SITES[1:5])


@pytest.mark.parametrize("kw, match", [
    ({"degree": 3}, "degree 3; it must be even"),
    ({"degree": 4, "order": SITES[:11] + SITES[:1]}, "not a permutation"),
    ({"degree": 4, "threshold": 2}, r"threshold 2 for groups of 5 sites; it must be in \[3, 5\]"),
    ({"degree": 4, "threshold": 6}, r"must be in \[3, 5\]"),
])
def test_a_plan_with_a_bad_graph_is_refused(kw, match):
    kw.setdefault("order", SITES[:12])
    with pytest.raises(ValueError, match=match):
        RoundPlan("r/1", SITES[:12], kw.pop("threshold", 3), make_ring(12), **kw)


def test_the_graph_travels_with_the_plan():
    plan = make_plan(12, degree=4)
    again = plan_from_config(plan_to_config(plan))
    assert again is not None and (again.degree, again.order) == (4, plan.order)
    assert all(again.neighbours(s) == plan.neighbours(s) for s in plan.sites)


@pytest.mark.parametrize("degree", [2, 4, 6])
def test_the_unmasked_sum_is_exact_with_a_drop_before_and_after_upload(degree, identities,
                                                                       roster):
    plan = make_plan(12, degree=degree)
    inputs = site_inputs(plan, _counts(plan.sites), seed=degree)
    before = [plan.order[0]]
    # silent at unmasking: a site far from the dropped one, so every neighbourhood keeps t
    after = [plan.order[6]]
    r = run_round(plan, identities, roster, inputs, drop_before=before, drop_after=after)
    kept = [s for s in plan.sites if s not in before]
    assert np.array_equal(r.result.levels(), plain_sum(plan, inputs, kept))
    assert r.result.dropped_before_upload == tuple(before)
    assert r.result.silent_at_unmask == tuple(after)


def test_a_site_shares_and_masks_with_its_neighbours_only(identities, roster):
    plan = make_plan(12, degree=4)
    inputs = site_inputs(plan, _counts(plan.sites))
    r = run_round(plan, identities, roster, inputs)
    for site, party in r.parties.items():
        assert set(party._peers) == plan.neighbours(site) | {site}
    assert np.array_equal(r.result.levels(), plain_sum(plan, inputs, plan.sites))


def test_a_neighbourhood_below_the_threshold_fails_the_round(identities, roster):
    """Site u drops before upload and two of its four neighbours are silent at unmasking: two
    shares of u's mask key are left, the threshold is three, so u's masks cannot be removed
    and the round fails instead of returning a wrong sum."""
    plan = make_plan(12, degree=4)
    inputs = site_inputs(plan, _counts(plan.sites))
    u = plan.order[0]
    silent = [plan.order[1], plan.order[-1]]
    with pytest.raises(TooFewSurvivors, match="stage 'unmask'"):
        run_round(plan, identities, roster, inputs, drop_before=[u], drop_after=silent)


def test_a_site_refuses_to_unmask_when_its_neighbourhood_is_below_the_threshold(identities,
                                                                                roster):
    """A survivor list that keeps this site but only one of its neighbours would let the
    aggregator isolate it (its sum with one neighbour): it reveals nothing."""
    plan = make_plan(12, degree=4)
    inputs = site_inputs(plan, _counts(plan.sites))
    r = run_round(plan, identities, roster, inputs)
    site = plan.order[0]
    near = sorted(plan.neighbours(site))
    survivors = [s for s in plan.sites if s not in near[1:]]
    with pytest.raises(TooFewSurvivors, match="stage 'unmask': 2 site"):
        r.parties[site].unmask(survivors)
