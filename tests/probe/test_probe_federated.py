"""The probe a site runs on the global model, and what the aggregator keeps of it: numbers under
the allowed keys only, per site and weighted by probe items."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aggregator.dashboard.data import clean_round
from aggregator.probe_report import probe_row, read_probe
from fed_unimiss import exchange as ex
from fed_unimiss.data.phantom import write_phantoms
from fed_unimiss.models import create_model
from fed_unimiss.probe.federated import probe_global_state, site_probe_config
from fed_unimiss.probe.run import load_probe_data
from fed_unimiss.ssl.config import load_recipe

RECIPE = "configs/pretrain/micro.yaml"
PROBE_CONFIG = "configs/probe/seg3d-micro.yaml"


def _global_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = {}
    for network in ex.PROBE_NETWORKS:
        state.update({f"{network}.{k}": v for k, v in create_model("micro").state_dict().items()})
    return state


def test_site_probe_sends_only_balanced_accuracies_and_counts(tmp_path):
    write_phantoms(tmp_path / "probe", n_ct=2, n_xray=0, labels=True, seed=4, fmt="nifti")
    recipe = load_recipe(RECIPE)
    cfg = site_probe_config("seg3d", recipe, PROBE_CONFIG)
    assert cfg.data.split == "patients" and cfg.seeds == (0, 1, 2) and not cfg.random_reference
    data = load_probe_data(cfg, tmp_path / "probe", tmp_path / "probe")
    assert (len(data.train), len(data.val)) == (1, 1)  # one folder, split by case
    metrics = probe_global_state(_global_state(0), recipe.model, data, cfg)
    expected = {ex.probe_key(n, s, k) for n in ex.PROBE_NETWORKS for s in (1, 2, 3, 4)
                for k in ex.PROBE_KINDS} | {ex.PROBE_ITEMS, ex.PROBE_SECONDS}
    assert set(metrics) == expected
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    assert metrics[ex.PROBE_ITEMS] == 1.0
    assert all(0 <= metrics[k] <= 1 for k in expected - {ex.PROBE_ITEMS, ex.PROBE_SECONDS})
    wire = json.dumps(metrics)
    assert "case-" not in wire and str(tmp_path) not in wire and "/" not in wire
    # What the aggregator keeps of it: the same numbers, grouped.
    kept = read_probe(metrics)
    assert kept["items"] == 1.0 and set(kept) == {"items", "seconds", "teacher", "student"}
    assert kept["teacher"]["stage4"]["knn"] == metrics["probe_teacher_stage4_knn"]


def test_aggregator_keeps_only_valid_probe_numbers():
    good = {ex.probe_key("teacher", 4, "knn"): 0.75, ex.PROBE_ITEMS: 3, "loss": 2.0,
            "probe_teacher_stage4_knn_path": 0.5, "probe_site_name": 1.0}
    assert read_probe(good) == {"items": 3.0, "seconds": None,
                                "teacher": {"stage4": {"knn": 0.75}}}
    assert read_probe({ex.probe_key("teacher", 4, "knn"): 1.5, ex.PROBE_ITEMS: 3}) is None
    assert read_probe({ex.probe_key("teacher", 4, "knn"): 0.5}) is None  # no item count
    assert read_probe({ex.probe_key("student", 1, "linear"): float("nan"),
                       ex.PROBE_ITEMS: 2}) is None
    assert read_probe({"loss": 1.0}) is None and read_probe(None) is None


def test_round_entry_weights_sites_by_probe_items():
    a = read_probe({ex.probe_key("teacher", 4, "knn"): 0.9, ex.probe_key("teacher", 4, "linear"):
                    0.6, ex.PROBE_ITEMS: 3})
    b = read_probe({ex.probe_key("teacher", 4, "knn"): 0.5, ex.probe_key("teacher", 4, "linear"):
                    0.2, ex.PROBE_ITEMS: 1})
    row = probe_row({"B": b, "A": a}, round_num=3)
    assert row["after_rounds"] == 2 and row["items"] == 4 and list(row["per_site"]) == ["A", "B"]
    # (3 x 0.9 + 1 x 0.5) / 4 = 0.8 and (3 x 0.6 + 1 x 0.2) / 4 = 0.5
    assert row["weighted"]["teacher"]["stage4"] == pytest.approx({"knn": 0.8, "linear": 0.5})


def test_dashboard_passes_on_only_the_allowed_probe_fields():
    row = {"round": 2, "probe": {
        "after_rounds": 1, "items": 4, "secret": "/hospital/pacs",
        "weighted": {"teacher": {"stage4": {"knn": 0.8, "note": "/x"}, "/etc": {"knn": 1}}},
        "per_site": {"A": {"items": 3, "teacher": {"stage4": {"knn": 0.9}}, "path": "/a"},
                     "/data/site-b": {"items": 1}}}}
    probe = clean_round(row, None)["probe"]
    assert probe == {"after_rounds": 1.0, "items": 4.0,
                     "weighted": {"teacher": {"stage4": {"knn": 0.8, "linear": None}}},
                     "per_site": {"A": {"items": 3.0,
                                        "teacher": {"stage4": {"knn": 0.9, "linear": None}}}}}
    assert clean_round({"round": 1}, None)["probe"] is None


def test_site_yaml_probe_section_reaches_the_node_config_and_a_missing_folder_is_named(tmp_path):
    from aggregator.provision import provision
    from site_client.supernode import SiteError, load_site_kit, site_node_config

    provision(["A"], tmp_path / "KITS", server_names=["127.0.0.1"])
    kit_dir = tmp_path / "KITS" / "site-A"
    (kit_dir / "probe-set").mkdir()
    settings = (kit_dir / "site.yaml").read_text()
    (kit_dir / "site.yaml").write_text(settings + "probe: {data: probe-set, task: seg3d}\n")
    kit = load_site_kit(kit_dir)
    config = site_node_config(kit, tmp_path, tmp_path / "state")
    assert config[ex.NODE_PROBE_DATA] == str(kit_dir / "probe-set")  # relative to the kit
    assert config[ex.NODE_PROBE_TASK] == "seg3d" and ex.NODE_PROBE_CONFIG not in config
    (kit_dir / "site.yaml").write_text(settings + "probe: {data: nowhere}\n")
    with pytest.raises(SiteError, match="probe.data: .*nowhere is not a folder"):
        load_site_kit(kit_dir)
    (kit_dir / "site.yaml").write_text(settings + "probe: {data: probe-set, task: seg4d}\n")
    with pytest.raises(SiteError, match="probe.task"):
        load_site_kit(kit_dir)
