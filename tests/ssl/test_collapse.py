"""Collapse indicators and the watch, on synthetic logits."""

from __future__ import annotations

import logging
import math

import torch

from fed_unimiss.ssl.collapse import CollapseStats, CollapseWatch, collapse_stats

K = 64


def _stats(student, teacher):
    return collapse_stats(student, teacher, torch.zeros(1, K), 0.1, 0.04)


def test_indicators_of_healthy_dimension_and_uniform_outputs():
    eye = torch.eye(K)[:16] * 5  # 16 samples, each its own prototype: sharp and diverse
    healthy = _stats([eye, eye], [eye, eye])
    assert healthy.teacher_entropy < 0.1 and healthy.batch_entropy > math.log(16) - 0.1
    same = torch.zeros(16, K)
    same[:, 3] = 5  # every sample on prototype 3
    dim = _stats([same, same], [same, same])
    assert dim.batch_entropy < 0.1
    flat = torch.zeros(16, K)
    uni = _stats([flat, flat], [flat, flat])
    assert math.isclose(uni.teacher_entropy, math.log(K), rel_tol=1e-5)
    assert uni.kl < 1e-5
    far = _stats([torch.roll(eye, 1, dims=1)] * 2, [eye, eye])
    assert far.kl > 1.0


def _feed(watch, losses, stats):
    out = []
    for i, loss in enumerate(losses):
        out += watch.update(i, loss, stats)
    return out


def test_watch_warns_on_falling_loss_with_collapse(caplog):
    falling = [5.0 - 0.1 * i for i in range(10)]
    dim = CollapseStats(teacher_entropy=0.01, batch_entropy=0.05, kl=0.0)
    with caplog.at_level(logging.WARNING, logger="fed_unimiss.ssl.collapse"):
        msgs = _feed(CollapseWatch(K, window=6), falling, dim)
    assert len(msgs) == 1 and "dimension" in msgs[0] and "failure" in msgs[0]
    assert any("teacher collapse (dimension)" in r.message for r in caplog.records)
    uniform = CollapseStats(teacher_entropy=math.log(K) - 0.01, batch_entropy=math.log(K), kl=0)
    watch = CollapseWatch(K, window=6)
    msgs = _feed(watch, falling, uniform)
    assert len(msgs) == 2  # once each, not once per step
    assert "(uniform)" in msgs[0] and "(no-spread)" in msgs[1]


def test_watch_is_quiet_when_healthy_or_loss_not_falling():
    falling = [5.0 - 0.1 * i for i in range(10)]
    healthy = CollapseStats(teacher_entropy=1.0, batch_entropy=3.5, kl=0.3)
    assert _feed(CollapseWatch(K, window=6), falling, healthy) == []
    rising = [1.0 + 0.1 * i for i in range(10)]
    dim = CollapseStats(teacher_entropy=0.01, batch_entropy=0.05, kl=0.0)
    assert _feed(CollapseWatch(K, window=6), rising, dim) == []


def _logits_stats(teacher):
    """Collapse stats of synthetic teacher logits (two views, the student = the teacher)."""
    return collapse_stats([teacher, teacher], [teacher, teacher], torch.zeros(1, K), 0.1, 0.04)


def test_uniform_drift_warns_even_with_a_rising_loss():
    """The failure the micro X-ray runs showed: teacher logits shrink towards a constant (so the
    centred, sharpened teacher drifts to uniform and gives all samples the same distribution)
    while the loss rises towards log(K)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, K, generator=g)
    watch = CollapseWatch(K, window=4)
    messages, kinds = [], []
    for i, scale in enumerate([0.2, 0.05, 0.01, 0.004, 0.002, 0.001, 0.001, 0.001, 0.001]):
        stats = _logits_stats(base * scale)
        new = watch.update(i, 2.0 + 0.5 * i, stats)  # the loss rises
        messages += new
        kinds += [k for k in ("uniform", "no-spread") if any(k in m for m in new)]
    assert sorted(kinds) == ["no-spread", "uniform"], messages
    assert all("whatever the loss does" in m for m in messages)


def test_sustained_signs_need_a_whole_window_and_rearm_after_recovery():
    g = torch.Generator().manual_seed(1)
    flat = _logits_stats(torch.randn(16, K, generator=g) * 1e-3)
    sharp = _logits_stats(torch.eye(K)[:16] * 5)  # every sample its own prototype
    assert flat.spread < 0.1 and sharp.spread > 2.0
    watch = CollapseWatch(K, window=5)
    rising = [3.0 + 0.1 * i for i in range(40)]
    # 4 flat points, one healthy point, 4 flat points: never a whole window, never a warning
    seq = [flat] * 4 + [sharp] + [flat] * 4
    assert [m for i, s in enumerate(seq) for m in watch.update(i, rising[i], s)] == []
    warned = [m for i in range(9, 10) for m in watch.update(i, rising[i], flat)]
    assert len(warned) == 2  # 5 flat points in a row: uniform drift and no spread
    assert [m for i in range(10, 14) for m in watch.update(i, rising[i], flat)] == []  # once
    watch.update(14, rising[14], sharp)  # recovery re-arms both
    again = [m for i in range(15, 20) for m in watch.update(i, rising[i], flat)]
    assert len(again) == 2


def test_healthy_sharp_diverse_teacher_is_quiet_for_long():
    sharp = _logits_stats(torch.eye(K)[:16] * 5)
    watch = CollapseWatch(K, window=3)
    assert [m for i in range(30) for m in watch.update(i, 5.0 - 0.1 * i, sharp)] == []


def test_a_few_one_prototype_batches_do_not_warn_but_a_window_of_them_does():
    """A CT batch of two tiles whose regions look alike lands on one prototype now and then (the
    micro recipe does this while the teacher separates 72 CT regions into 6-7 prototypes); only a
    whole window of such batches with a falling loss is dimension collapse."""
    one = CollapseStats(teacher_entropy=0.01, batch_entropy=0.02, kl=0.1)
    healthy = CollapseStats(teacher_entropy=1.0, batch_entropy=2.0, kl=0.3)
    watch = CollapseWatch(K, window=4)
    falling = [20.0 - 0.5 * i for i in range(40)]
    seq = ([healthy] * 4 + [one] * 3) * 3
    assert [m for i, s in enumerate(seq) for m in watch.update(i, falling[i], s, "3d")] == []
    warned = [m for i in range(21, 25) for m in watch.update(i, falling[i], one, "3d")]
    assert len(warned) == 1 and "(dimension) in 3d steps" in warned[0]


def test_phases_keep_their_own_trend_and_streaks():
    """X-ray losses (~3) after CT losses (~12) are not a falling loss, and an X-ray streak is not
    continued by CT steps."""
    dim = CollapseStats(teacher_entropy=0.01, batch_entropy=0.05, kl=0.0)
    healthy = CollapseStats(teacher_entropy=1.0, batch_entropy=3.5, kl=0.3)
    watch = CollapseWatch(K, window=4)
    step = 0
    for _ in range(3):  # alternating blocks; each phase on its own has a rising loss
        for _i in range(4):
            assert watch.update(step, 12.0 + 0.1 * step, healthy, "3d") == []
            step += 1
        for _i in range(4):
            assert watch.update(step, 3.0 + 0.1 * step, dim, "2d") == []
            step += 1
    # a falling X-ray trend on its own makes the same X-ray signs a warning
    warned = [m for i in range(4) for m in watch.update(step + i, 1.0 - 0.1 * i, dim, "2d")]
    assert len(warned) == 1 and "in 2d steps" in warned[0]
