"""Fast: count bounds, per-part norm bounds, the round's screening, replays, status.

Hand-made tensors and the real strategy through the in-process grid with a toy ClientApp (as
tests/federation/test_rounds.py); the attacks on real training are in test_attacks.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from aggregator.attacks import parse_attack
from aggregator.cli import _status
from aggregator.inprocess import InProcessGrid, SiteSpec
from aggregator.rounds import FederationRun, run_federation
from aggregator.screening import clip_state, cosines_to_others, screen_round
from aggregator.validation import (
    ReplyLimits,
    ReplyRejected,
    SiteReport,
    check_counts,
    check_state,
    count_bound,
)
from fed_unimiss import exchange as ex

NAMES = ["student.backbone.stem_2d.w", "student.head.w", "teacher.backbone.stem_2d.w",
         "teacher.head.w", "center"]
SITES = ("a", "b", "c", "d")


def _initial() -> dict[str, torch.Tensor]:
    return {n: torch.linspace(-1, 1, 12).reshape(3, 4) * (i + 1) for i, n in enumerate(NAMES)}


def _honest_delta(name: str, site: str) -> torch.Tensor:
    """Every site moves in one shared direction plus a small site-specific one."""
    g = torch.Generator().manual_seed(sum(map(ord, name + site)))
    return 0.1 * torch.ones(3, 4) + 0.02 * torch.randn(3, 4, generator=g)


def _toy_app(bad: dict[str, str]) -> ClientApp:
    app = ClientApp()
    first: dict[str, dict] = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        name = context.node_config[ex.NODE_SITE_NAME]
        sent = msg.content.array_records[ex.ARRAYS].to_torch_state_dict()
        first.setdefault(name, sent)
        state = {k: v + _honest_delta(k, name) for k, v in sent.items()}
        s2, s3 = 8, 1
        kind = bad.get(name)
        if kind == "teacher":  # only the teacher pulled far away
            state = {k: (v * 40 if k.startswith("teacher.") else v) for k, v in state.items()}
        elif kind == "center":
            state["center"] = sent["center"] + 3.0
        elif kind == "flip":
            state = {k: 2 * sent[k] - v for k, v in state.items()}
        elif kind == "counts":
            s2 = 10**9
        elif kind == "stale":
            state = first[name]
        return Message(RecordDict({
            ex.ARRAYS: ArrayRecord(state),
            ex.METRICS: MetricRecord({ex.SAMPLES_2D: s2, ex.SAMPLES_3D: s3, ex.LOSS: 1.0}),
            ex.SITE: ConfigRecord({ex.SITE_NAME_KEY: name}),
        }), reply_to=msg)

    return app


def _run(tmp: Path, bad: dict[str, str], rounds: int = 2, **fields) -> list[dict]:
    body = {"recipe": {"ssl": {"steps_per_epoch": 1, "batch_size_2d": 8, "batch_size_3d": 1,
                               "view_depth": 8}},
            "local_steps": 2, "min_sites": 2, "round_timeout": 30, "evaluate": False,
            "poll_interval": 0.01, "max_update_norm": 10.0, **fields}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "fed.yaml").write_text(json.dumps(body))
    grid = InProcessGrid(_toy_app(bad), [SiteSpec(s, tmp) for s in SITES], tmp / "sites")
    run = FederationRun.from_files(tmp / "fed.yaml", tmp / "run", rounds)
    run_federation(grid, run, initial=_initial())
    return [json.loads(line) for line in (tmp / "run" / "rounds.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- counts
def test_count_bound_is_local_steps_times_batch_sizes_per_kind():
    b = count_bound(local_steps=4, batch_size_2d=4, batch_size_3d=1, view_depth=8)
    assert (b.max_2d, b.max_3d) == (32, 4)  # a 3D step also sends 8 slices through 2D
    dp = count_bound(4, 4, 1, 8, patients_per_step=2.0)
    assert (dp.max_2d, dp.max_3d) == (64, 8)
    check_counts(SiteReport(32, 4, {}), b)
    with pytest.raises(ReplyRejected, match="samples_2d 1000000000 above the round's bound 32"):
        check_counts(SiteReport(10**9, 0, {}), b)
    with pytest.raises(ReplyRejected, match="samples_3d 5 above"):
        check_counts(SiteReport(8, 5, {}), b)


def test_inflated_counts_are_rejected_every_round(tmp_path):
    rows = _run(tmp_path, {"d": "counts"})
    for row in rows:
        assert "d" not in row["sites"]
        assert row["decisions"]["d"]["action"] == "rejected"
        assert "above the round's bound 16" in row["rejected"]["d"]
        assert [row["decisions"][s]["action"] for s in "abc"] == ["accepted"] * 3


def test_default_norm_bound_sits_between_honest_micro_updates_and_the_probe_attack():
    """The recipe's Adam bound for configs/federation/micro.yaml: above the largest honest
    micro update measured (0.90, docs/federation.md), below the pull-to-zero probe (86.6)."""
    from aggregator.rounds import initial_state

    repo = Path(__file__).resolve().parents[2]
    run = FederationRun.from_files(repo / "configs/federation/micro.yaml", "unused", 2)
    state = initial_state(run.recipe, 8)
    limits = ReplyLimits.of_run(run.cfg, run.recipe, state)
    assert 0.90 * 3 < limits.max_update_norm < 20
    zero_pull = math.sqrt(sum(float(v.pow(2).sum()) for k, v in state.items()
                              if k.startswith("student.")))
    assert zero_pull > 4 * limits.max_update_norm
    assert (limits.counts.max_2d, limits.counts.max_3d) == (32, 4)


def test_derived_bounds_give_teacher_and_center_their_own_geometry():
    """The micro federation's derived bounds: the student's is Adam's, the teacher's is its EMA
    share of (gap + that), the center's is the logit box's diameter, 2.1 sqrt(out_dim)."""
    from aggregator.rounds import initial_state

    repo = Path(__file__).resolve().parents[2]
    run = FederationRun.from_files(repo / "configs/federation/micro.yaml", "unused", 2)
    state = initial_state(run.recipe, 8)
    limits = ReplyLimits.of_run(run.cfg, run.recipe, state)
    bounds = limits.part_bounds(state)
    assert limits.derived and bounds["student"] == limits.max_update_norm
    pull = 1 - run.recipe.ssl.momentum_teacher ** run.cfg.local_steps
    assert bounds["teacher"] == pytest.approx(pull * limits.max_update_norm)  # teacher == student
    assert bounds["center"] == pytest.approx(2.1 * math.sqrt(state["center"].numel()))
    moved = dict(state)
    moved["teacher.head.last_layer.weight_v"] = state["teacher.head.last_layer.weight_v"] + 0.01
    gap = 0.01 * math.sqrt(state["teacher.head.last_layer.weight_v"].numel())
    assert limits.part_bounds(moved)["teacher"] == pytest.approx(
        pull * (gap + limits.max_update_norm), rel=1e-6)


def test_any_center_our_head_produces_stays_inside_the_checked_box():
    """Real DINOHead logits (wildly scaled features) through real DINOLoss center updates: every
    coordinate stays in [-1, 1], so check_center accepts it and the center bound covers the
    move, however small the student's bound (tiny: center 13.1 against a student bound of 4.9)."""
    from aggregator.validation import CENTER_LIMIT, check_center
    from fed_unimiss.models.head import DINOHead
    from fed_unimiss.ssl.dino_loss import DINOLoss

    torch.manual_seed(0)
    head, loss = DINOHead(32, 512, hidden_dim=64, bottleneck_dim=16), DINOLoss(512)
    start = loss.center.clone()
    with torch.no_grad():
        for step in range(50):
            logits = head(torch.randn(6, 32) * 10 ** (step % 4))
            loss.update_center([logits])
    assert float(loss.center.abs().max()) <= 1.0
    check_center(loss.center)
    moved = float((loss.center - start).norm())
    limits = ReplyLimits(0.1, derived=True, teacher_pull=0.1)
    bound = limits.part_bounds({"center": start})["center"]
    assert 1.0 < moved <= bound == pytest.approx(2 * CENTER_LIMIT * math.sqrt(512))
    with pytest.raises(ReplyRejected, match=r"center coordinate 1.5 outside \[-1.05, 1.05\]"):
        check_center(torch.full((1, 512), 0.1).index_fill_(1, torch.tensor([7]), -1.5))


# ---------------------------------------------------------------- per-part bounds, screening
def test_teacher_and_center_are_bounded_like_the_student():
    g = _initial()
    state = {k: v + (50.0 if k == "center" else 0.01) for k, v in g.items()}
    with pytest.raises(ReplyRejected, match="center update norm .* exceeds max_update_norm"):
        check_state(state, g, 10.0)
    norms = check_state({k: v + 0.01 for k, v in g.items()}, g, 10.0)
    assert set(norms) == {"student", "teacher", "center"}
    assert norms["center"] == pytest.approx(0.01 * math.sqrt(12), rel=1e-4)  # float32 sums


@pytest.mark.parametrize("bad, part", [("teacher", "teacher")])
def test_a_part_far_above_the_round_median_is_rejected(tmp_path, bad, part):
    rows = _run(tmp_path, {"d": bad}, max_update_norm=1.0e4)
    for row in rows:
        d = row["decisions"]["d"]
        assert d["action"] == "rejected" and d["reason"].startswith(f"{part} update norm")
        assert "x the round median" in d["reason"] and d["vs_median"][part] > 5
        assert row["sites"] == ["a", "b", "c"]
        for s in "abc":
            assert row["per_site"][s]["action"] == "accepted"
            assert 0.5 < row["per_site"][s]["vs_median"]["student"] < 2


def test_a_center_far_above_the_round_median_is_clipped_to_norm_factor_times_it(tmp_path):
    """The center moves with the kind of data a site trained (an honest site reached 5.5x), so
    its outliers are clipped, not rejected: the site stays in, its center's pull is bounded."""
    rows = _run(tmp_path, {"d": "center"}, rounds=1, max_update_norm=1.0e4)
    row = rows[0]
    d = row["decisions"]["d"]
    assert d["action"] == "clipped" and d["vs_median"]["center"] > 5
    assert "center x" in d["reason"] and "norm_factor 5" in d["reason"]
    assert set(d["clip_scale"]) == {"center"}
    assert row["sites"] == ["a", "b", "c", "d"]
    from fed_unimiss.checkpoint import load_checkpoint

    got, _ = load_checkpoint(tmp_path / "run" / "global_round_0001.safetensors")
    g = _initial()
    honest = [_honest_delta("center", s) for s in "abc"]
    median = sorted(float(h.norm()) for h in [*honest, 3.0 + _honest_delta("center", "d")])[1:3]
    bound = 5 * sum(median) / 2  # the clipped center moves at most 5 x the median
    moved = (got["center"] - g["center"]) * 4 - sum(honest)  # d's share of the mean, x 4
    assert float(moved.norm()) <= bound * 1.001
    assert float(moved.norm()) > 0.9 * bound  # clipped to the bound, not dropped


def test_sign_flipped_update_is_rejected_by_direction(tmp_path):
    rows = _run(tmp_path, {"d": "flip"})
    for row in rows:
        d = row["decisions"]["d"]
        assert d["action"] == "rejected"
        assert "teacher update points against the other replies' median" in d["reason"]
        assert d["cosine"]["teacher"] < -0.5
        assert min(row["per_site"][s]["cosine"]["teacher"] for s in "abc") > 0.5


def test_stale_replay_is_rejected(tmp_path):
    rows = _run(tmp_path, {"d": "stale"}, rounds=3)
    assert "identical to the global state sent in round 1" in rows[0]["rejected"]["d"]
    assert "identical to the global state sent in round 1" in rows[2]["rejected"]["d"]


def test_honest_round_is_untouched_by_screening_in_mean_mode(tmp_path):
    rows = _run(tmp_path, {})
    for row in rows:
        assert row["rejected"] == {} and row["sites"] == list("abcd")
        assert {d["action"] for d in row["decisions"].values()} == {"accepted"}
        assert set(row["screening"]["median_norm"]) == {"student", "teacher", "center"}


def test_clipped_mean_clips_to_the_median_and_folds_the_clipped_state():
    g = _initial()
    states = {s: {k: v + (i + 1) * 0.1 for k, v in g.items()} for i, s in enumerate("abc")}
    norms = {s: check_state(st, g, 1e4) for s, st in states.items()}
    medians, verdicts = screen_round(norms, states, g, 5.0, None, clip_to_median=True)
    assert [verdicts[s].action for s in "abc"] == ["accepted", "accepted", "clipped"]
    assert verdicts["c"].scales["student"] == pytest.approx(2 / 3)
    clipped = clip_state(states["c"], g, verdicts["c"].scales)
    assert check_state(clipped, g, 1e4)["student"] == pytest.approx(medians["student"])


def test_clipped_mean_clips_to_the_median_of_the_replies_it_keeps():
    """A rejected reply must not set the norm honest replies are clipped to."""
    g = _initial()
    states = {s: {k: v + (i + 1) * 0.1 for k, v in g.items()} for i, s in enumerate("abc")}
    states["d"] = {k: v - 0.35 for k, v in g.items()}  # flipped, and the largest
    norms = {s: check_state(st, g, 1e4) for s, st in states.items()}
    medians, verdicts = screen_round(norms, states, g, 5.0, -0.1, clip_to_median=True)
    assert verdicts["d"].action == "rejected"
    assert medians["student"] == pytest.approx(norms["b"]["student"] * 2.5 / 2)  # of all 4
    assert "student" not in verdicts["b"].scales  # b is the median of a, b, c
    assert verdicts["c"].scales["student"] == pytest.approx(2 / 3)


def test_clipped_mean_federation_names_the_clipped_sites(tmp_path):
    rows = _run(tmp_path, {}, aggregation="clipped_mean")
    for row in rows:
        assert row["rejected"] == {} and len(row["sites"]) == 4
        clipped = [s for s, d in row["decisions"].items() if d["action"] == "clipped"]
        assert clipped and all("clipped to the round's median norm" in
                               row["decisions"][s]["reason"] for s in clipped)


def test_cosines_are_taken_to_the_median_of_the_other_replies():
    g = _initial()
    up = {k: v + 0.1 for k, v in g.items()}
    down = {k: v - 0.1 for k, v in g.items()}
    cos = cosines_to_others({"a": up, "b": up, "e": up, "c": down}, g)
    assert set(cos["a"]) == {"teacher"}  # the direction check's one part
    assert cos["a"]["teacher"] == pytest.approx(1.0) and cos["c"]["teacher"] == pytest.approx(-1)
    cos = cosines_to_others({"a": up, "b": up, "c": down}, g)
    assert cos["a"]["teacher"] == 1.0  # the others' median (up + down) / 2 is 0: nothing to judge
    # A reply that is half the round cannot make its own reference: with 4 replies, 2 up and
    # 2 down, the median of all 4 is 0, but each sees the others' median pointing against it.
    cos = cosines_to_others({"a": up, "b": up, "c": down, "d": down}, g, ("student",))
    assert all(cos[s]["student"] == pytest.approx(-1.0) for s in "abcd")


# ---------------------------------------------------------------- status, CLI
def test_status_shows_norm_vs_median_and_every_rejection(tmp_path, capsys):
    _run(tmp_path, {"d": "flip"})

    class Args:
        out, kit, json = str(tmp_path / "run"), None, False

    assert _status(Args()) == 0
    text = capsys.readouterr().out
    assert "norm / round median" in text
    assert "a: round 2 accepted, student" in text
    assert text.count("rejected: teacher update points against") == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    lowest = min((r["decisions"]["a"]["cosine"]["teacher"], r["round"]) for r in rows)
    assert f"(lowest {lowest[0]:+.3f}, round {lowest[1]})" in text  # how close a came to -0.1
    d_line = next(line for line in text.splitlines() if line.strip().startswith("d: round 2"))
    assert "cosine -" in d_line and "lowest" not in d_line  # never accepted


def test_parse_attack():
    assert parse_attack("B=signflip") == ("B", "signflip")
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="KIND one of replace, inflate"):
        parse_attack("B=melt")
