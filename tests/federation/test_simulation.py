"""End to end: the real ServerApp and site ClientApps, in process, on phantom sites.

3 sites (CT only, X-ray only, both), micro recipe, 2 rounds. A tap on the in-process transport
records what each site really sent; the test recomputes every round's dimension-aware weighted
average from those replies on its own and compares it with the checkpoint. In round 2 the tap
also corrupts the X-ray site's reply with a NaN, which the aggregator must drop.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from federation_helpers import exchange_kind, expected_mean, micro_federation
from flwr.app import Message

from aggregator.inprocess import InProcessGrid
from aggregator.simulate_cli import simulate
from fed_unimiss import exchange as ex
from fed_unimiss.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _config(tmp: Path) -> Path:
    return micro_federation(tmp / "federation.yaml")


class TapGrid(InProcessGrid):
    """Records every instruction and reply; poisons the X-ray site's round-2 train reply."""

    log: list[tuple[Message, Message | None]] = []

    def deliver(self, msg):
        reply = super().deliver(msg)
        is_train = msg.metadata.message_type == ex.TRAIN
        if is_train and msg.metadata.group_id == "2" and msg.metadata.dst_node_id == 2:
            record = reply.content.array_records[ex.ARRAYS]
            state = record.to_torch_state_dict()
            state["center"][0, 0] = float("nan")
            reply.content[ex.ARRAYS] = type(record)(state)
        TapGrid.log.append((msg, reply))
        return reply




@pytest.fixture(scope="module")
def federation(phantom_sites, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("federation")
    config = _config(tmp)
    sites = [(name, path) for name, path in phantom_sites.items()]
    TapGrid.log = []
    simulate(config, sites, rounds=2, out=tmp / "run", grid_cls=TapGrid)
    return tmp, config, sites, list(TapGrid.log)


def test_each_round_is_the_dimension_aware_average_of_the_replies(federation):
    tmp, _, _, log = federation
    rows = [json.loads(x) for x in (tmp / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["sites"] == ["both", "ct", "xr"] and rows[0]["rejected"] == {}
    assert rows[1]["sites"] == ["both", "ct"] and "non-finite" in rows[1]["rejected"]["xr"]
    assert all(isinstance(r["loss"], float) and "eval_loss" in r for r in rows)
    for rnd in (1, 2):
        train = [(m, r) for m, r in log if m.metadata.message_type == ex.TRAIN
                 and m.metadata.group_id == str(rnd)]
        assert len(train) == 3
        sent = train[0][0].content.array_records[ex.ARRAYS].to_torch_state_dict()
        replies = []
        for _, reply in train:
            state = reply.content.array_records[ex.ARRAYS].to_torch_state_dict()
            m = reply.content.metric_records[ex.METRICS]
            if all(torch.isfinite(t).all() for t in state.values()):
                replies.append((state, m[ex.SAMPLES_2D], m[ex.SAMPLES_3D]))
        counts = {reply.content.config_records[ex.SITE][ex.SITE_NAME_KEY]:
                  (reply.content.metric_records[ex.METRICS][ex.SAMPLES_2D],
                   reply.content.metric_records[ex.METRICS][ex.SAMPLES_3D]) for _, reply in train}
        assert counts["xr"][1] == 0 and counts["ct"][1] > 0 and counts["ct"][0] > 0
        got, meta = load_checkpoint(tmp / "run" / f"global_round_{rnd:04d}.safetensors")
        expected = expected_mean(sent, replies)
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
            assert torch.isfinite(got[name]).all()
        assert meta["round"] == rnd
    # round 2's global state is what round 1 checkpointed
    first, _ = load_checkpoint(tmp / "run" / "global_round_0001.safetensors")
    sent2 = [m for m, _ in log if m.metadata.group_id == "2"][0]
    for name, t in sent2.content.array_records[ex.ARRAYS].to_torch_state_dict().items():
        assert torch.equal(t, first[name])
    # a 3D tensor is averaged over CT sites only: the X-ray site's value did not count
    assert any(exchange_kind(n) == "3d" for n in first)


def test_replies_hold_only_state_tensors_and_numbers(federation):
    _, _, _, log = federation
    # the run's last word goes to xr alone (its poisoned round-2 update was rejected) ...
    assert [m.metadata.dst_node_id for m, _ in log if m.metadata.message_type == ex.QUERY] == [2]
    for msg, reply in log:
        assert reply is not None and not reply.has_error()
        content = reply.content
        if msg.metadata.message_type == ex.QUERY:  # ... and is answered by an empty record
            assert not (content.array_records or content.metric_records
                        or content.config_records)
            continue
        assert set(content.config_records) <= {ex.SITE}
        for record in content.config_records.values():
            assert dict(record) == {ex.SITE_NAME_KEY: record[ex.SITE_NAME_KEY]}
            assert record[ex.SITE_NAME_KEY] in {"ct", "xr", "both"}
        assert set(content.metric_records) == {ex.METRICS}
        for key, value in content.metric_records[ex.METRICS].items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        if msg.metadata.message_type == ex.TRAIN:
            assert set(content.array_records) == {ex.ARRAYS}
            sent = msg.content.array_records[ex.ARRAYS]
            got = content.array_records[ex.ARRAYS]
            assert list(got.keys()) == list(sent.keys())
            assert all(a.dtype == "float32" for a in got.values())
        else:
            assert set(content.array_records) == set()


def test_resume_after_crash_gives_identical_state(federation, tmp_path):
    tmp, config, sites, _ = federation
    # What a crash during round 2 leaves behind: round 1's checkpoint and log line.
    crashed = tmp_path / "run"
    crashed.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(tmp / "run" / f"global_round_0001{suffix}", crashed)
    (crashed / "rounds.jsonl").write_text(
        (tmp / "run" / "rounds.jsonl").read_text().splitlines()[0] + "\n")
    TapGrid.log = []
    simulate(config, sites, rounds=2, out=crashed, resume=True, grid_cls=TapGrid)
    # round 2 only: its train and evaluate messages, and the run's last word to the site whose
    # poisoned round-2 update was rejected
    assert {m.metadata.group_id for m, _ in TapGrid.log} == {"2", "2-eval", "2-verdict"}
    a, _ = load_checkpoint(tmp / "run" / "global_round_0002.safetensors")
    b, _ = load_checkpoint(crashed / "global_round_0002.safetensors")
    assert set(a) == set(b)
    worst = max(a, key=lambda n: float((a[n] - b[n]).abs().max()))
    # float32 CPU kernels may differ in the last bits between runs; 1e-5 is far below a step
    torch.testing.assert_close(a[worst], b[worst], rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{worst}: {m}")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
