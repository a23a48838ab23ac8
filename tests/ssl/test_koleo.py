"""KoLeo regulariser: value on hand-checkable points, gradient that spreads, engine wiring."""

from __future__ import annotations

import math

import pytest
import torch

from fed_unimiss.ssl.dino_loss import koleo_loss
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.site_data import SiteData


def test_koleo_value_is_minus_mean_log_nearest_distance():
    # Three unit vectors: e0, e1 and a vector at 60 degrees from e0 (distance 1 to e0).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, math.sqrt(3) / 2]])
    # nearest distances: e0 -> third (1.0); e1 -> third (2 sin 15 deg); third -> e1 (same)
    d_e1 = 2 * math.sin(math.radians(15))
    expected = -(math.log(1.0) + 2 * math.log(d_e1)) / 3
    assert float(koleo_loss(3.0 * x)) == pytest.approx(expected, abs=1e-5)  # scale-free


def test_koleo_gradient_pushes_close_points_apart():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    before = float(koleo_loss(x.detach()))
    koleo_loss(x).backward()
    with torch.no_grad():
        after = float(koleo_loss(x - 0.1 * x.grad))
    assert after < before


def test_koleo_of_one_sample_is_zero_and_bad_shapes_are_named():
    assert float(koleo_loss(torch.randn(1, 4))) == 0.0
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        koleo_loss(torch.randn(2, 3, 4))


def test_koleo_weight_is_validated(recipe_factory):
    from fed_unimiss.config import ConfigError

    with pytest.raises(ConfigError, match="koleo_weight"):
        recipe_factory(koleo_weight=-1.0)


def test_engine_adds_the_koleo_term_to_both_kinds_of_step(site_data, recipe_factory):
    recipe = recipe_factory(koleo_weight=0.5, steps_per_epoch=1, alternate_interval=1)
    engine = SelfDistillation(recipe, 4)
    hist = engine.train_steps(SiteData(xray=site_data.xray, ct=site_data.ct), 0, 2).history
    assert [h["phase"] for h in hist] == ["2d", "3d"]
    for h in hist:
        assert math.isfinite(h["loss_koleo"])
    x, c = hist
    # the logged total is the DINO part plus the KoLeo part
    assert x["loss"] == pytest.approx(x["loss_2d"] + x["loss_koleo"], rel=1e-5)
    dino_3d = sum(c[k] for k in ("loss_volume", "loss_slice_volume", "loss_slice",
                                 "loss_volume_slice"))
    assert c["loss"] == pytest.approx(dino_3d + c["loss_koleo"], rel=1e-5)
    plain = SelfDistillation(recipe_factory(steps_per_epoch=1, alternate_interval=1), 4)
    assert "loss_koleo" not in plain.train_steps(SiteData(xray=site_data.xray), 0, 1).history[0]


def test_koleo_path_gives_the_plain_forward_logits(recipe_factory):
    from fed_unimiss.ssl.steps import _student_views

    engine = SelfDistillation(recipe_factory(), 4)
    views = [torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(i))
             for i in range(2)]
    with torch.no_grad():
        plain, none = _student_views(engine.student, views, 0.0)
        logits, koleo = _student_views(engine.student, views, 2.0)
    assert none is None and koleo is not None and math.isfinite(float(koleo))
    for a, b in zip(plain, logits, strict=True):
        torch.testing.assert_close(a, b)
