"""Schedules and phases are pure functions of the global step; resume mid-epoch/round is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_unimiss.ssl.config import SSLConfig
from fed_unimiss.ssl.schedules import (
    Schedules,
    cosine_at,
    cosine_schedule,
    phase_at,
    phase_steps_before,
)


def _dino_cosine(base, final, total, warmup):
    """DINO's utils.cosine_scheduler written out for one epoch of ``total`` iterations."""
    warm = np.linspace(0, base, warmup) if warmup else np.array([])
    iters = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warm, cos))


def test_cosine_without_warmup_matches_dino():
    np.testing.assert_allclose(cosine_schedule(0.04, 0.4, 50), _dino_cosine(0.04, 0.4, 50, 0))


def test_warmup_is_linear_then_cosine_to_the_floor():
    s = cosine_schedule(1.0, 0.0, 100, warmup_steps=10)
    assert s[0] == 0.0 and math.isclose(s[5], 0.5) and math.isclose(s[10], 1.0)
    assert np.all(np.diff(s[10:]) <= 0) and s[-1] < 0.01
    assert cosine_at(1000, 1.0, 0.0, 100, 10) == 0.0  # past the plan: stay at the floor


def test_phase_alternates_in_blocks_of_interval_epochs():
    phases = [phase_at(s, 3, 2, True, True) for s in range(24)]
    assert phases == ["2d"] * 6 + ["3d"] * 6 + ["2d"] * 6 + ["3d"] * 6
    assert {phase_at(s, 3, 2, True, False) for s in range(24)} == {"2d"}
    assert {phase_at(s, 3, 2, False, True) for s in range(24)} == {"3d"}
    with pytest.raises(ValueError, match="neither"):
        phase_at(0, 3, 2, False, False)


@pytest.mark.parametrize("has", [(True, True), (True, False), (False, True)])
def test_phase_steps_before_counts_like_a_replay(has):
    spe, interval = 3, 2
    counts = {"2d": 0, "3d": 0}
    for s in range(40):
        for phase in ("2d", "3d"):
            assert phase_steps_before(s, phase, spe, interval, *has) == counts[phase]
        counts[phase_at(s, spe, interval, *has)] += 1


def test_resume_mid_epoch_gives_the_same_schedule_values():
    cfg = SSLConfig(steps_per_epoch=7, warmup_epochs=2, epochs=5, batch_size_2d=64,
                    batch_size_3d=32)
    whole = Schedules.from_config(cfg, 35)
    # a "resumed" process builds its schedules from scratch and starts at step 17 (mid epoch 2)
    resumed = Schedules.from_config(cfg, 35)
    for s in range(17, 35):
        phase = whole.phase(s, True, True)
        assert resumed.phase(s, True, True) == phase
        assert resumed.lr_at(s, phase) == whole.lr_at(s, phase)
        assert resumed.momentum_at(s) == whole.momentum_at(s)
        assert resumed.weight_decay_at(s) == whole.weight_decay_at(s)


def test_schedule_endpoints_and_lr_scaling():
    cfg = SSLConfig(steps_per_epoch=10, warmup_epochs=1, epochs=3, batch_size_2d=128,
                    batch_size_3d=64, freeze_last_layer=1)
    s = Schedules.from_config(cfg, 30)
    assert math.isclose(s.lr_at(10, "2d"), 0.0008 * 128 / 256)
    assert math.isclose(s.lr_at(10, "3d"), 0.0008 * 64 / 256)
    assert math.isclose(s.momentum_at(0), 0.996) and math.isclose(s.weight_decay_at(0), 0.04)
    assert s.momentum_at(29) > 0.9999 and s.weight_decay_at(29) > 0.399
    assert s.last_layer_frozen(9) and not s.last_layer_frozen(10)
    assert s.position(12, True, True)["epoch"] == 1


def test_schedules_need_steps_per_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Schedules.from_config(SSLConfig(), 100)
