"""End to end: sites with a labelled probe set probe the global model every probe_every rounds;
rounds.jsonl and `aggregator status` show it per site and weighted, and the replies carry only
numbers under the allowed keys.

Real ServerApp and site ClientApps in process (``simulate``), micro recipe, 3 rounds with
probe_every 2: rounds 1 and 3 probe, round 2 does not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from federation_helpers import micro_federation

from aggregator.inprocess import InProcessGrid
from aggregator.simulate_cli import simulate
from fed_unimiss import exchange as ex
from fed_unimiss.cli.main import main as cli_main
from fed_unimiss.data.phantom import write_phantoms

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# Every metric a train reply may carry besides the probe's (the training report and DP's).
TRAIN_KEYS = set(ex.TRAIN_METRICS) | set(ex.COUNT_METRICS)


class TapGrid(InProcessGrid):
    """Records every train instruction's probe flag and every train reply's metrics."""

    flags: list[tuple[str, bool]] = []
    replies: list[dict] = []

    def deliver(self, msg):
        reply = super().deliver(msg)
        if msg.metadata.message_type == ex.TRAIN:
            config = msg.content.config_records[ex.CONFIG]
            TapGrid.flags.append((msg.metadata.group_id, bool(config.get(ex.PROBE, False))))
            if reply is not None and not reply.has_error():
                TapGrid.replies.append(dict(reply.content.metric_records[ex.METRICS]))
        return reply


@pytest.fixture(scope="module")
def probed_run(phantom_sites, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe-run")
    write_phantoms(tmp / "probe-ct", n_ct=2, n_xray=0, labels=True, seed=11, fmt="nifti")
    write_phantoms(tmp / "probe-xr", n_ct=4, n_xray=0, labels=True, seed=12, fmt="nifti")
    config = micro_federation(tmp / "federation.yaml", probe_every=2, evaluate=False)
    probe_cfg = REPO / "configs" / "probe" / "seg3d-micro.yaml"
    probes = {"ct": ex.probe_node_config(tmp / "probe-ct", "seg3d", probe_cfg),
              "xr": ex.probe_node_config(tmp / "probe-xr", "seg3d", probe_cfg)}
    TapGrid.flags, TapGrid.replies = [], []
    sites = [("ct", phantom_sites["ct"]), ("xr", phantom_sites["xr"])]
    simulate(config, sites, rounds=3, out=tmp / "run", grid_cls=TapGrid, probes=probes)
    rows = [json.loads(line) for line in (tmp / "run" / "rounds.jsonl").read_text().splitlines()]
    return tmp, rows


def test_probe_rounds_are_recorded_per_site_and_weighted(probed_run):
    _, rows = probed_run
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert "probe" not in rows[1]  # probe_every 2: rounds 1 and 3
    for row in (rows[0], rows[2]):
        probe = row["probe"]
        assert probe["after_rounds"] == row["round"] - 1
        assert set(probe["per_site"]) == {"ct", "xr"}
        items = {s: v["items"] for s, v in probe["per_site"].items()}
        assert items == {"ct": 1.0, "xr": 2.0} and probe["items"] == 3.0
        for network in ex.PROBE_NETWORKS:
            for stage in ("stage1", "stage2", "stage3", "stage4"):
                for kind in ex.PROBE_KINDS:
                    values = {s: v[network][stage][kind] for s, v in probe["per_site"].items()}
                    assert all(0 <= v <= 1 for v in values.values())
                    expected = sum(values[s] * items[s] for s in values) / 3
                    assert probe["weighted"][network][stage][kind] == pytest.approx(expected)
    # round 1 probes the initial model, where teacher and student are the same network
    first = rows[0]["probe"]["weighted"]
    assert first["teacher"] == first["student"]


def test_train_replies_carry_only_numbers_under_allowed_keys(probed_run):
    assert sorted(TapGrid.flags) == sorted([("1", True)] * 2 + [("2", False)] * 2
                                           + [("3", True)] * 2)
    with_probe = [m for m in TapGrid.replies if ex.PROBE_ITEMS in m]
    assert len(with_probe) == 4 and len(TapGrid.replies) == 6
    for metrics in TapGrid.replies:
        for key, value in metrics.items():
            assert key in TRAIN_KEYS or ex.PROBE_KEY.match(key) \
                or key in (ex.PROBE_ITEMS, ex.PROBE_SECONDS), key
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        probe_keys = [k for k in metrics if ex.PROBE_KEY.match(k)]
        assert len(probe_keys) in (0, 16)  # 2 networks x 4 stages x 2 classifiers


def test_aggregator_status_shows_the_probe_per_round(probed_run, capsys):
    tmp, rows = probed_run
    assert cli_main(["aggregator", "status", "--out", str(tmp / "run")]) == 0
    text = capsys.readouterr().out
    assert "probe of the global model" in text
    w = rows[2]["probe"]["weighted"]["teacher"]["stage4"]
    assert f"round 3 (after 2): {w['knn']:.3f}/{w['linear']:.3f}" in text
    assert "ct " in text.split("round 3 (after 2)")[1] and "xr " in text
    assert cli_main(["aggregator", "status", "--out", str(tmp / "run"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [p["round"] for p in summary["probe"]] == [1, 3]
    assert summary["probe"][1]["weighted"] == rows[2]["probe"]["weighted"]


def test_the_probe_leaves_training_untouched(probed_run, phantom_sites):
    """The same federation without probe sets trains to the same losses and the same model."""
    tmp, rows = probed_run
    sites = [("ct", phantom_sites["ct"]), ("xr", phantom_sites["xr"])]
    simulate(tmp / "federation.yaml", sites, rounds=3, out=tmp / "plain")
    plain = [json.loads(line) for line in (tmp / "plain" / "rounds.jsonl").read_text()
             .splitlines()]
    for a, b in zip(rows, plain, strict=True):
        assert "probe" not in b
        assert {s: v.get("loss") for s, v in a["per_site"].items()} == \
            {s: v.get("loss") for s, v in b["per_site"].items()}
    last = "global_round_0003.safetensors"
    assert (tmp / "run" / last).read_bytes() == (tmp / "plain" / last).read_bytes()
