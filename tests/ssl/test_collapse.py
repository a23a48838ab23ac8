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
    assert any("collapsed" in r.message for r in caplog.records)
    uniform = CollapseStats(teacher_entropy=math.log(K) - 0.01, batch_entropy=math.log(K), kl=0)
    msgs = _feed(CollapseWatch(K, window=6), falling, uniform)
    assert len(msgs) == 1 and "uniform" in msgs[0]


def test_watch_is_quiet_when_healthy_or_loss_not_falling():
    falling = [5.0 - 0.1 * i for i in range(10)]
    healthy = CollapseStats(teacher_entropy=1.0, batch_entropy=3.5, kl=0.3)
    assert _feed(CollapseWatch(K, window=6), falling, healthy) == []
    rising = [1.0 + 0.1 * i for i in range(10)]
    dim = CollapseStats(teacher_entropy=0.01, batch_entropy=0.05, kl=0.0)
    assert _feed(CollapseWatch(K, window=6), rising, dim) == []
