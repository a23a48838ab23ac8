"""The recipe learns: on phantom X-rays and CT (micro preset) the loss falls by a clear margin
within a few steps while the teacher is not collapsed (bounded, seeded, CPU)."""

from __future__ import annotations

import math

import pytest

from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.site_data import SiteData

# Fast settings for a handful of steps: no warm-up or last-layer freeze, a high lr.
FAST = {"warmup_epochs": 0, "freeze_last_layer": 0, "lr": 0.1, "steps_per_epoch": 100,
        "epochs": 1}


def _losses(engine, data, steps):
    stats = engine.train_steps(data, 0, steps)
    assert stats.steps == steps and stats.skipped == 0
    return stats.history


@pytest.mark.slow
def test_xray_loss_falls(site_data, recipe_factory):
    recipe = recipe_factory(batch_size_2d=4, momentum_teacher=0.996, **FAST)
    hist = _losses(SelfDistillation(recipe, 100), SiteData(xray=site_data.xray), 6)
    first, best = hist[0]["loss"], min(h["loss"] for h in hist[3:])
    assert best < 0.7 * first, [round(h["loss"], 3) for h in hist]
    assert hist[-1]["kl"] < hist[0]["kl"]  # the student learns to match the teacher
    uniform = math.log(recipe.model.head_out_dim)
    assert all(h["teacher_entropy"] < 0.98 * uniform for h in hist)  # not uniform collapse
    assert all(h["batch_entropy"] > 0.1 * uniform for h in hist)  # not one prototype for all


@pytest.mark.slow
def test_ct_loss_falls(site_data, recipe_factory):
    recipe = recipe_factory(batch_size_3d=2, momentum_teacher=0.996, **FAST)
    hist = _losses(SelfDistillation(recipe, 100), SiteData(ct=site_data.ct), 6)
    assert all(h["phase"] == "3d" for h in hist)
    first, later = hist[0]["loss"], sum(h["loss"] for h in hist[2:]) / 4
    assert later < 0.9 * first, [round(h["loss"], 3) for h in hist]
    uniform = math.log(recipe.model.head_out_dim)
    assert all(h["teacher_entropy"] < 0.98 * uniform for h in hist)
    assert all(h["batch_entropy"] > 0.1 * uniform for h in hist)
