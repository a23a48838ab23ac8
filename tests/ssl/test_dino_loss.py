"""DINOLoss on small hand-checkable tensors: value, same-view skipping, center update."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fed_unimiss.ssl.dino_loss import DINOLoss


def _manual_loss(student, teacher, center, ts=0.1, tt=0.04):
    total, n = 0.0, 0
    for i, t in enumerate(teacher):
        q = F.softmax((t - center) / tt, dim=-1)
        for j, s in enumerate(student):
            if i == j:
                continue
            total += (-(q * F.log_softmax(s / ts, dim=-1)).sum(-1)).mean()
            n += 1
    return total / n


def test_loss_value_and_center_update():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(4, 8, generator=g) for _ in range(2)]
    teacher = [torch.randn(4, 8, generator=g) for _ in range(2)]
    loss_fn = DINOLoss(8)
    loss_fn.center.copy_(torch.randn(1, 8, generator=g))
    c0 = loss_fn.center.clone()
    loss = loss_fn(student, teacher)
    torch.testing.assert_close(loss, _manual_loss(student, teacher, c0))
    expected_center = 0.9 * c0 + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_same_view_pairs_are_skipped():
    # identical teacher/student views: a loss that included i == j would differ from the manual one
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 8, generator=g) for _ in range(3)]
    loss_fn = DINOLoss(8)
    loss = loss_fn(views, [v.clone() for v in views], update_center=False)
    torch.testing.assert_close(loss, _manual_loss(views, views, torch.zeros(1, 8)))
    with_same = sum((-(F.softmax(v / 0.04, -1) * F.log_softmax(v / 0.1, -1)).sum(-1)).mean()
                    for v in views)
    assert not math.isclose(float(loss), float((loss * 6 + with_same) / 9), rel_tol=1e-6)


def test_no_center_update_when_disabled_and_no_teacher_gradient():
    student = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    loss_fn = DINOLoss(8)
    loss_fn(student, teacher, update_center=False).backward()
    assert torch.equal(loss_fn.center, torch.zeros(1, 8))
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_center_is_a_buffer_in_the_state_dict():
    assert list(DINOLoss(16).state_dict()) == ["center"]


def test_mismatched_views_are_rejected():
    with pytest.raises(ValueError, match="same number"):
        DINOLoss(8)([torch.zeros(2, 8)] * 2, [torch.zeros(2, 8)] * 3)


def test_sinkhorn_targets_are_balanced_and_sample_dependent():
    g = torch.Generator().manual_seed(1)
    common = torch.randn(1, 16, generator=g) * 0.3  # a large shared component, as at init
    teacher = [common + 0.05 * torch.randn(8, 16, generator=g) for _ in range(2)]
    loss_fn = DINOLoss(16, centering="sinkhorn", sinkhorn_iterations=50)
    q = torch.cat(loss_fn.teacher_targets(teacher))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))  # one distribution per sample
    # ... whose prototype usage is balanced (1/K each) although the logits share a common peak,
    torch.testing.assert_close(q.mean(dim=0), torch.full((16,), 1 / 16), atol=1e-3, rtol=0)
    # ... unlike the centred softmax with a fresh (zero) center, which puts everything on it.
    plain = torch.cat(DINOLoss(16).teacher_targets(teacher))
    assert plain.mean(dim=0).max() > 0.9
    # The Sinkhorn path still moves the (exchanged) center.
    student = [torch.randn(8, 16, generator=g) for _ in range(2)]
    loss_fn(student, teacher)
    assert loss_fn.center.abs().sum() > 0


def test_sinkhorn_matches_the_loss_targets():
    g = torch.Generator().manual_seed(2)
    student = [torch.randn(4, 8, generator=g) for _ in range(2)]
    teacher = [torch.randn(4, 8, generator=g) for _ in range(2)]
    loss_fn = DINOLoss(8, centering="sinkhorn")
    q = loss_fn.teacher_targets(teacher)
    expected = sum((-(q[i] * F.log_softmax(student[1 - i] / 0.1, dim=-1)).sum(-1)).mean()
                   for i in range(2)) / 2
    torch.testing.assert_close(loss_fn(student, teacher, update_center=False), expected)


def test_unknown_centering_is_rejected():
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(8, centering="mean")
