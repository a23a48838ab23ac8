"""Dimension-aware averaging and reply validation on small hand-made tensor dicts."""

from __future__ import annotations

import math

import pytest
import torch

from aggregator.averaging import CoordinateRobust, WeightedMean, make_aggregator
from aggregator.validation import ReplyRejected, parse_report, site_label, validate_state
from fed_unimiss import exchange as ex

CLASSES = {"student.patch_embed_3d.w": "3d", "student.stem_2d.w": "2d",
           "teacher.blocks.0.w": "shared", "center": "shared"}


def _state(value: float) -> dict[str, torch.Tensor]:
    return {name: torch.full((2, 3), value) for name in CLASSES}


def test_classify_exchange_keys_uses_model_rule_after_prefix():
    names = ["student.backbone.encoder.stem_3d.conv.weight", "teacher.backbone.pos_embed_2d.p",
             "student.head.mlp.0.weight", "center"]
    assert ex.classify_exchange_keys(names) == {
        names[0]: "3d", names[1]: "2d", names[2]: "shared", "center": "shared"}
    with pytest.raises(ValueError, match="expected a name starting with"):
        ex.classify_exchange_keys(["backbone.x"])


def test_weighted_mean_is_dimension_aware():
    glob = _state(0.0)
    agg = WeightedMean(glob, CLASSES)
    agg.add(_state(1.0), samples_2d=0, samples_3d=2)   # CT tiles only (no slices counted)
    agg.add(_state(4.0), samples_2d=6, samples_3d=0)   # X-ray only
    agg.add(_state(10.0), samples_2d=2, samples_3d=2)  # both
    out = agg.result()
    # 3d: sites 1 and 3 weighted 2:2; 2d: sites 2 and 3 weighted 6:2; shared: 2, 6, 4.
    assert torch.allclose(out["student.patch_embed_3d.w"], torch.full((2, 3), 5.5))
    assert torch.allclose(out["student.stem_2d.w"], torch.full((2, 3), (4 * 6 + 10 * 2) / 8))
    shared = (1 * 2 + 4 * 6 + 10 * 4) / 12
    assert torch.allclose(out["teacher.blocks.0.w"], torch.full((2, 3), shared))
    assert torch.allclose(out["center"], torch.full((2, 3), shared))
    assert all(t.dtype == torch.float32 for t in out.values())


def test_tensor_nobody_trained_keeps_global_value():
    glob = _state(7.0)
    agg = WeightedMean(glob, CLASSES)
    agg.add(_state(1.0), samples_2d=5, samples_3d=0)
    out = agg.result()
    assert torch.equal(out["student.patch_embed_3d.w"], glob["student.patch_embed_3d.w"])
    assert out["student.patch_embed_3d.w"] is not glob["student.patch_embed_3d.w"]
    assert torch.allclose(out["student.stem_2d.w"], torch.ones(2, 3))


def test_median_and_trimmed_mean_over_eligible_sites():
    glob = _state(0.0)
    med = CoordinateRobust(glob, CLASSES, "median")
    trim = make_aggregator("trimmed_mean", glob, CLASSES, trim_fraction=0.25)
    for v in (1.0, 2.0, 3.0, 100.0):
        med.add(_state(v), 1, 1)
        trim.add(_state(v), 1, 1)
    med.add(_state(-50.0), 1, 0)  # X-ray only: not eligible for 3d tensors
    m = med.result()
    assert torch.allclose(m["student.patch_embed_3d.w"], torch.full((2, 3), 2.5))
    assert torch.allclose(m["student.stem_2d.w"], torch.full((2, 3), 2.0))
    assert torch.allclose(trim.result()["center"], torch.full((2, 3), 2.5))  # drops 1 and 100


def test_validate_state_accepts_good_and_reports_norm():
    glob = _state(0.0)
    norm = validate_state(_state(1.0), glob, max_update_norm=100.0)
    assert math.isclose(norm, math.sqrt(4 * 6))


@pytest.mark.parametrize("corrupt, reason", [
    (lambda s: s.update({"center": torch.full((2, 3), float("nan"))}), "non-finite"),
    (lambda s: s.update({"center": torch.zeros(3, 2)}), "shape"),
    (lambda s: s.pop("center"), "missing: center"),
    (lambda s: s.update({"extra": torch.zeros(1)}), "1 unexpected"),
    (lambda s: s.update({"center": torch.zeros(2, 3, dtype=torch.float64)}), "dtype"),
    (lambda s: s.update({"center": torch.full((2, 3), 1e6)}), "exceeds max_update_norm"),
])
def test_validate_state_rejects(corrupt, reason):
    state = _state(0.5)
    corrupt(state)
    with pytest.raises(ReplyRejected, match=reason):
        validate_state(state, _state(0.0), max_update_norm=100.0)


@pytest.mark.parametrize("metrics, reason", [
    ({ex.SAMPLES_2D: -1, ex.SAMPLES_3D: 2}, "non-negative integer"),
    ({ex.SAMPLES_2D: 1.5, ex.SAMPLES_3D: 2}, "non-negative integer"),
    ({ex.SAMPLES_2D: 0, ex.SAMPLES_3D: 0}, "both sample counts are zero"),
    ({ex.SAMPLES_3D: 2}, "missing"),
    ({ex.SAMPLES_2D: 1, ex.SAMPLES_3D: 2, ex.LOSS: float("inf")}, "not finite"),
])
def test_parse_report_rejects_bad_counts(metrics, reason):
    with pytest.raises(ReplyRejected, match=reason):
        parse_report(metrics)


def test_parse_report_and_site_label():
    report = parse_report({ex.SAMPLES_2D: 3, ex.SAMPLES_3D: 2.0, ex.LOSS: 1.25})
    assert (report.samples_2d, report.samples_3d, report.metrics) == (3, 2, {ex.LOSS: 1.25})
    assert site_label("A", 5) == "A"
    assert site_label("/data/patient 17", 5) == "node-5"
    assert site_label(None, 5) == "node-5"
    assert site_label("x" * 65, 5) == "node-5"


def test_site_seed_is_stable_and_distinct():
    assert ex.site_seed(0, 1, "A") == ex.site_seed(0, 1, "A")
    assert len({ex.site_seed(0, r, s) for r in (1, 2) for s in "AB"}) == 4
