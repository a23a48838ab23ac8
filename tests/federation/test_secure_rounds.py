"""Secure aggregation as an exchange mode: the real ServerApp and site ClientApps, in process.

``exchange.up: secure`` against the plain exchange with the same seeds, a site that drops before
its masked input and one that drops after, what rounds.jsonl and the checkpoints keep, and a
roster key that is not the site's own. The protocol's own arithmetic (the unmasked sum equals
the plain sum of the quantised updates, as integers) is tested in tests/secure_aggregation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from federation_helpers import micro_federation
from flwr.app import Error, Message

from aggregator.inprocess import InProcessGrid
from aggregator.rounds import RoundFailed
from aggregator.simulate_cli import simulate, simulated_roster
from fed_unimiss import exchange as ex
from fed_unimiss.checkpoint import load_checkpoint
from fed_unimiss.config import ConfigError
from fed_unimiss.federation import load_federation
from fed_unimiss.secure_aggregation.wire import MASKED_INPUT, STAGE, UNMASK
from flower_layer.identity import CLIENT_APP_RAISED_EXCEPTION

PARTS = ("student", "teacher", "center")
# Keys that would describe one site's update; secure mode must record none of them per site.
PER_SITE_HIDDEN = {"update_norm", "norms", "vs_median", "cosine", "min_cosine"}


def _secure(tmp: Path, name: str = "secure", **secure) -> Path:
    ex_section = {"up": "secure", "down": "fp32", **({"secure": secure} if secure else {})}
    return micro_federation(tmp / f"{name}.yaml", min_sites=3, evaluate=False,
                            exchange=ex_section)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, match", [
    ({"min_sites": 2}, "min_sites: must be >= 3 with exchange.up: secure"),
    ({"aggregation": "median"}, "aggregation: median needs every site's update"),
    ({"aggregation": "clipped_mean"}, "aggregation: clipped_mean needs every site's update"),
    ({"exchange": {"up": "q8_delta", "secure": {"bits": 16}}},
     "exchange: secure: set only with up: secure"),
    ({"exchange": {"up": "secure", "secure": {"bits": 4}}}, r"exchange.secure: bits: must be in"),
    ({"exchange": {"up": "secure", "secure": {"clip": -1}}}, "exchange.secure: clip: must be"),
    ({"exchange": {"up": "secure", "secure": {"threshold": 1}}},
     "exchange.secure: threshold: must be >= 2"),
    ({"exchange": {"up": "secure", "secure": {"levls": 3}}}, "levls: unknown field"),
])
def test_config_refuses_what_secure_aggregation_cannot_do(tmp_path, fields, match):
    body = {"min_sites": 3, "exchange": {"up": "secure"}, **fields}
    path = micro_federation(tmp_path / "f.yaml", **body)
    with pytest.raises((ConfigError, ValueError), match=match):
        load_federation(path)


def test_a_neighbour_graph_is_planned_only_when_it_is_sparser_than_everyone(tmp_path):
    """``neighbours: k`` below sites - 1 gives each round a fresh random circle; at or above
    it, the complete graph (plain SecAgg)."""
    import dataclasses

    from aggregator.secure_round import make_plan
    from aggregator.validation import ReplyLimits
    from fed_unimiss.exchange_config import SecureConfig

    roster = dict.fromkeys(("a", "b", "c", "d", "e", "f"))
    state = {"student.w": torch.zeros(10)}
    plan = make_plan("r/1", roster, SecureConfig(neighbours=2), ((10, "shared"),),
                     ["student.w"], state, ReplyLimits(1.0))
    assert plan.degree == 2 and sorted(plan.order) == sorted(roster) and plan.threshold == 2
    full = make_plan("r/1", roster, dataclasses.replace(SecureConfig(), neighbours=6),
                     ((10, "shared"),), ["student.w"], state, ReplyLimits(1.0))
    assert full.degree is None and full.threshold == 4
    with pytest.raises(ValueError, match="neighbours: must be an even number"):
        SecureConfig(neighbours=3).validate()


def test_config_takes_the_secure_section_and_its_defaults(tmp_path):
    cfg = load_federation(micro_federation(tmp_path / "f.yaml", min_sites=3, exchange={
        "up": "secure", "teacher": "local", "secure": {"levels": 63, "clip": 0.01}}))
    assert cfg.exchange.masked and cfg.exchange.ring.levels == 63
    assert cfg.exchange.ring.bits == 16 and cfg.exchange.ring.threshold is None
    plain = load_federation(micro_federation(tmp_path / "p.yaml", min_sites=1))
    assert not plain.exchange.masked


# ---------------------------------------------------------------------------- simulations

@pytest.fixture(scope="module")
def secure_and_plain(phantom_sites, tmp_path_factory):
    """3 sites x 3 rounds, secure and plain (fp32 both ways), same recipe and seeds."""
    tmp = tmp_path_factory.mktemp("secure-vs-plain")
    sites = list(phantom_sites.items())
    simulate(_secure(tmp), sites, rounds=3, out=tmp / "secure")
    plain = micro_federation(tmp / "plain.yaml", min_sites=3, evaluate=False,
                             exchange={"up": "fp32", "down": "fp32"})
    simulate(plain, sites, rounds=3, out=tmp / "plain")
    return tmp / "secure", tmp / "plain"


def _checkpoint(run: Path, rnd: int) -> tuple[dict[str, torch.Tensor], dict]:
    return load_checkpoint(run / f"global_round_{rnd:04d}.safetensors")


@pytest.mark.slow
def test_secure_model_is_the_plain_model_within_quantisation_error(secure_and_plain):
    """Round 1 starts both runs from the same state, and training is deterministic, so the
    sites' updates are the same; secure mode adds only the ring's rounding. Each site's
    rounding error is below one step (clip / levels) per coordinate, so the weighted mean's
    error is too: every coordinate of the round-1 model is within one step of its part's
    largest step (nothing was clipped). From round 2 on the sites train from states that
    differ by that much, and Adam's normalised steps spread such differences chaotically (a
    trajectory cosine to the plain run measured from 0.83 to 0.98 with fresh rounding), so the
    last round is held to what only a wrong sum breaks: every coordinate within the rounds'
    steps plus, for rounds 2 and 3, the largest move each run may make (the ring's clip, from
    Adam's step bound); measured at 0.16-0.19 of that bound."""
    secure, plain = secure_and_plain
    rows = _rows(secure)
    assert [r["sites"] for r in rows] == [["both", "ct", "xr"]] * 3
    assert all(r["screening"]["clipped"] == 0 and r["screening"]["mode"] == "secure"
               for r in rows)
    s1, _ = _checkpoint(secure, 1)
    p1, _ = _checkpoint(plain, 1)
    steps = rows[0]["screening"]["ring"]["step"]
    for part in PARTS:
        worst = max(float((s1[n] - p1[n]).abs().max()) for n in s1 if n.startswith(part))
        assert worst <= steps[part] * (1 + 1e-4), (part, worst, steps[part])
    s3, _ = _checkpoint(secure, 3)
    p3, _ = _checkpoint(plain, 3)
    levels = rows[0]["screening"]["ring"]["levels"]
    for part in PARTS:
        by_round = [r["screening"]["ring"]["step"][part] for r in rows]
        bound = sum(by_round) + 2 * levels * sum(by_round[1:])
        worst = max(float((s3[n] - p3[n]).abs().max()) for n in s3 if n.startswith(part))
        assert worst <= 1.05 * bound, (part, worst, bound)


@pytest.mark.slow
def test_secure_rows_and_checkpoints_record_nothing_per_site_that_masking_hides(
        secure_and_plain):
    secure, plain = secure_and_plain

    def hidden_keys(entry: dict) -> set[str]:
        return PER_SITE_HIDDEN & set(entry)

    for rnd, row in enumerate(_rows(secure), start=1):
        _, meta = _checkpoint(secure, rnd)
        for source in (row, meta["round_log"]):
            for site, entry in {**source["per_site"], **source["decisions"]}.items():
                assert not hidden_keys(entry), (rnd, site, hidden_keys(entry))
            screening = source["screening"]
            assert not set(screening) & {"median_norm", "min_cosine", "norm_factor"}
            assert not {"both", "ct", "xr"} & set(json.dumps(screening).split('"'))
            assert set(screening["mean_update_norm"]) == set(PARTS)  # the aggregate's only
            assert source["exchange"] == "down=fp32 up=secure teacher=exchanged"
    # the plain run does record them: the check above looks where they would be
    assert "update_norm" in _rows(plain)[0]["per_site"]["ct"]


class DropGrid(InProcessGrid):
    """Site ``xr`` (node 2) dies before its masked input in round 1; site ``both`` (node 3)
    after it, at the unmasking of round 2 (as a killed ClientApp: an error reply)."""

    drops = {("1", MASKED_INPUT): 2, ("2", UNMASK): 3}

    def deliver(self, msg: Message) -> Message | None:
        if msg.metadata.message_type == ex.SECURE_STAGE:
            config = msg.content.config_records[ex.CONFIG]
            key = (str(config[ex.ROUND]), str(config[STAGE]))
            if self.drops.get(key) == msg.metadata.dst_node_id:
                return Message(Error(CLIENT_APP_RAISED_EXCEPTION, "ClientApp was killed"),
                               reply_to=msg)
        return super().deliver(msg)


@pytest.mark.slow
def test_a_site_dropped_before_upload_and_one_after_do_not_stall_or_spoil_the_round(
        phantom_sites, tmp_path):
    """4 sites on a neighbour graph (SecAgg+: 2 neighbours each, so a site's shares are with
    2 others and the threshold is 2 of its group of 3; min_sites 3): a drop before upload
    leaves the round to 3 survivors, whose shares remove the dropped site's masks; a drop
    after upload leaves the dropped site's update in the sum (its self mask rebuilt from its
    neighbours' shares)."""
    sites = [*phantom_sites.items(), ("ct2", phantom_sites["ct"])]
    run = tmp_path / "run"
    simulate(_secure(tmp_path, neighbours=2), sites, rounds=2, out=run, grid_cls=DropGrid)
    first, second = _rows(run)
    assert first["screening"]["neighbours"] == 2 and first["screening"]["threshold"] == 2
    assert first["sites"] == ["both", "ct", "ct2"]
    assert first["screening"]["dropped_before_upload"] == ["xr"]
    assert "dropped out of the secure round" in first["rejected"]["xr"]
    assert second["sites"] == ["both", "ct", "ct2", "xr"]
    assert second["screening"]["silent_at_unmask"] == ["both"]
    assert second["rejected"] == {}
    for rnd in (1, 2):
        state, _ = _checkpoint(run, rnd)
        assert all(bool(torch.isfinite(t).all()) for t in state.values())
    assert "xr" not in first["per_site"] and first["decisions"]["xr"]["action"] == "rejected"


@pytest.mark.slow
def test_a_roster_key_that_is_not_the_sites_own_is_refused_naming_the_site(
        phantom_sites, tmp_path):
    """The roster says site xr has another key: xr's signed keys are refused, by name, and
    the round (min_sites 3) fails cleanly with the reason; no checkpoint is written."""
    from aggregator.provision import _new_key, _ssh_public

    run = tmp_path / "run"
    roster, _ = simulated_roster(run, list(phantom_sites))
    (roster / "xr.pub").write_bytes(_ssh_public(_new_key(), "not-xr"))
    with pytest.raises(RoundFailed, match=r"xr: secure round: site 'xr': advertised keys "
                       r"refused \(the signature does not verify\)"):
        simulate(_secure(tmp_path), list(phantom_sites.items()), rounds=1, out=run)
    assert not list(run.glob("global_round_*"))


def test_part_steps_cover_every_part():
    """The per-part step recorded in rounds.jsonl is the largest step of the part's blocks."""
    import numpy as np

    from aggregator.secure_round import part_steps
    from fed_unimiss.secure_aggregation import RingPlan, RoundPlan

    items = [("center", (3,)), ("student.a", (5,)), ("teacher.a", (5,))]
    ring = RingPlan(bits=16, levels=3, max_weight=10, n_sites=3, block=4,
                    scales=np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32),
                    layout=((3, "shared"), (5, "shared"), (5, "shared")))
    plan = RoundPlan("r/1", ("a", "b", "c"), 2, ring)
    steps = part_steps(plan, items)
    # center: block 0; student: coordinates 3..7 (blocks 0, 1); teacher: 8..12 (blocks 2, 3)
    assert steps == {"center": 1.0, "student": 2.0, "teacher": 4.0}
    assert math.isclose(sum(steps.values()), 7.0)


@pytest.mark.parametrize("teacher", ["exchanged", "local"])
def test_the_exchange_quantises_an_update_and_adds_the_mean_back(teacher):
    """One site's side and the aggregator's, without the masks (they cancel): the state the
    aggregator rebuilds is the site's within one quantisation step per coordinate, a teacher
    that stays local is not in the vector, and the rounding's loss is kept for next time."""
    from fed_unimiss.exchange_config import ExchangeConfig
    from fed_unimiss.exchange_link import Exchange
    from fed_unimiss.secure_aggregation.ring import mean_update, plan_ring

    gen = torch.Generator().manual_seed(0)
    received = {"center": torch.zeros(4), "student.a_2d": torch.randn(3, 5, generator=gen),
                "student.b_3d": torch.randn(7, generator=gen),
                "teacher.a_2d": torch.randn(3, 5, generator=gen),
                "teacher.b_3d": torch.randn(7, generator=gen)}
    new = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in received.items()}
    classes = {"center": "shared", "student.a_2d": "2d", "student.b_3d": "3d",
               "teacher.a_2d": "2d", "teacher.b_3d": "3d"}
    cfg = ExchangeConfig(up="secure", teacher=teacher)
    site, agg = Exchange(cfg), Exchange(cfg)
    layout = agg.ring_layout(received, classes)
    assert len(layout) == (5 if teacher == "exchanged" else 3)
    ring = plan_ring(layout, n_sites=3, max_count=10, clip=0.05, levels=31, block=8)
    weights = {"2d": 4, "3d": 0, "shared": 4}  # an X-ray-only site: nothing for 3D tensors
    vector, clipped = site.quantise_update(new, received, ring, weights, seed=bytes(32))
    assert clipped == 0 and site.ring_residual is not None
    rebuilt = agg.add_mean(received, mean_update(vector, ring, weights))
    step = 0.05 / 31
    for name, value in rebuilt.items():
        if teacher == "local" and name.startswith("teacher."):
            assert torch.equal(value, received[name])  # not exchanged: the site keeps its own
        elif name.endswith("_3d"):
            assert torch.equal(value, received[name])  # weight 0: a 2D site adds nothing
        else:
            assert float((value - new[name]).abs().max()) <= step * (1 + 1e-5), name
    assert bool(site.teacher) == (teacher == "local")


@pytest.mark.slow
def test_a_dp_site_keeps_its_own_guarantee_and_ledger_under_secure_aggregation(
        phantom_sites, tmp_path):
    """DP composes: site xr trains with DP-SGD and spends from its own ledger exactly as in the
    plain exchange (what it sends is a post-processing of its noised training, masked or not);
    its epsilon travels in the clear, as a count does, and the masked sum takes its update."""
    cfg = micro_federation(
        tmp_path / "secure-dp.yaml", min_sites=3, evaluate=False,
        recipe_overrides={"model": {"head_weight_norm": False},
                          "ssl": {"steps_per_epoch": 1, "batch_size_2d": 2, "batch_size_3d": 1,
                                  "threads": 1, "koleo_weight": 0.0}},
        exchange={"up": "secure", "down": "fp32"})
    run = tmp_path / "run"
    simulate(cfg, list(phantom_sites.items()), rounds=2, out=run,
             dp_flags={"dp-epsilon": ["xr=8"], "dp-planned-rounds": ["xr=2"],
                       "dp-patients-per-step": ["xr=2"]})
    rows = _rows(run)
    assert [r["sites"] for r in rows] == [["both", "ct", "xr"]] * 2
    assert all(r["screening"]["mode"] == "secure" and r["rejected"] == {} for r in rows)
    eps = [r["epsilon"]["xr"] for r in rows]
    assert 0 < eps[0] < eps[1] <= 8.0
    assert all(set(r["epsilon"]) == {"xr"} for r in rows)
    ledger = json.loads((run / "sites" / "xr" / "privacy_ledger.json").read_text())
    assert [r["epsilon"] for r in ledger["rounds"]] == pytest.approx(eps)


@pytest.mark.slow
def test_one_attacker_under_secure_aggregation_is_bounded_by_the_aggregate_check(
        phantom_sites, tmp_path):
    """Nobody screens one site's update in secure mode, so an attacker writes what it likes
    into its ring vector (aggregator/attacks.py). What holds: a sum that moves a part further
    than one honest update may (``replace``: the all-zero model at the largest weight) is
    refused, the run stops with the reason and no round is written; nothing names the
    attacker, because nothing can."""
    with_m = [*phantom_sites.items(), ("M", phantom_sites["both"])]
    run = tmp_path / "run"
    with pytest.raises(RoundFailed, match="the mean update exceeds the bound of one honest "
                                          "update: student"):
        simulate(_secure(tmp_path), with_m, rounds=1, out=run, attacks={"M": "replace"})
    assert not list(run.glob("global_round_*"))
