"""Per-patient gradients of the real micro MiT equal one-patient-at-a-time gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fed_unimiss.privacy import (
    DPSGD,
    GhostFactors,
    PrivacyConfig,
    linear_layers,
    per_sample_gradients,
)
from fed_unimiss.ssl.config import load_recipe
from fed_unimiss.ssl.dp_step import DPStep
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.steps import patient_step_loss, per_sample_teacher_logits

LAST = ("head.last_layer",)
RECIPE = "configs/pretrain/micro.yaml"


def _engine() -> SelfDistillation:
    recipe = load_recipe(RECIPE)
    recipe = dataclasses.replace(
        recipe, model=dataclasses.replace(recipe.model, head_weight_norm=False),
        ssl=dataclasses.replace(recipe.ssl, koleo_weight=0.0))
    return SelfDistillation(recipe, 10,
                            gradient_step=DPStep(PrivacyConfig(enabled=True), 1.0, dp_seed=0))


@pytest.mark.parametrize("ghost", [(), LAST, "all"], ids=["materialised", "ghost-last", "ghost-all"])
@pytest.mark.parametrize("phase,shape", [("2d", (3, 2, 3, 48, 48)), ("3d", (2, 2, 1, 8, 48, 48))])
def test_per_patient_rows_equal_single_patient_backward(phase, shape, ghost):
    """Every row, including the ghost-clipped last layer's factored rows (both views, and for CT
    the volume calls and the slice calls of the same layer), equals a one-patient backward."""
    torch.manual_seed(0)
    engine = _engine()
    views = torch.randn(shape)
    targets = per_sample_teacher_logits(engine.teacher, phase, views)
    loss = patient_step_loss(engine.loss_fn, phase)
    student = engine.student
    ghost = linear_layers(student) if ghost == "all" else ghost
    grads, losses = per_sample_gradients(student, loss, [views, *targets], ghost=ghost)
    ghosted = [n for n, g in grads.items() if isinstance(g, GhostFactors)]
    assert ("head.last_layer.weight" in ghosted) == bool(ghost)
    # mixed ghost clipping: the head's layers are factored, the fine stage's attention is not
    assert "backbone.encoder.stages.0.0.attn.q.weight" not in ghosted
    for name in ghosted:
        factors = grads[name]
        rows = factors.rows()
        sq = factors.sq_norms()
        assert torch.allclose(sq, rows.flatten(1).pow(2).sum(1), rtol=1e-4)
        grads[name] = rows
    for b in range(shape[0]):
        student.zero_grad()
        one = loss(student, views[b], *(t[b] for t in targets))
        one.backward()
        assert float(losses[b]) == pytest.approx(float(one), rel=1e-5)
        for name, p in student.named_parameters():
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            scale = float(ref.abs().max()) + 1e-8
            err = float((grads[name][b] - ref).abs().max()) / scale
            assert err < 1e-3, f"{phase} patient {b} {name}: relative error {err:.2e}"


def test_empty_poisson_batch_still_takes_a_noisy_step():
    engine = _engine()
    opt = torch.optim.SGD(engine.student.parameters(), lr=1.0)
    dp = DPSGD(engine.student, opt, noise_multiplier=1.0, max_grad_norm=1.0,
               expected_batch_size=2.0, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in engine.student.named_parameters()}
    losses = dp.step(patient_step_loss(engine.loss_fn, "2d"), [], batch_size=0)
    assert losses.numel() == 0
    moved = [n for n, p in engine.student.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every parameter received noise


def test_clipping_bounds_each_patient_contribution():
    torch.manual_seed(0)
    engine = _engine()
    student = engine.student
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    clip = 1e-3
    dp = DPSGD(student, opt, noise_multiplier=1e-12, max_grad_norm=clip, expected_batch_size=1.0)
    views = torch.randn(2, 2, 3, 48, 48)
    targets = per_sample_teacher_logits(engine.teacher, "2d", views)
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    dp.step(patient_step_loss(engine.loss_fn, "2d"), [views, *targets], batch_size=2)
    after = torch.cat([p.detach().flatten() for p in student.parameters()])
    # SGD lr 1, divisor 1: the update is the sum of two clipped rows, so its norm <= 2 x clip.
    assert 0 < float((after - before).norm()) <= 2 * clip * (1 + 1e-4)


@pytest.mark.parametrize("phase,shape", [("2d", (4, 2, 3, 48, 48)), ("3d", (3, 2, 1, 8, 48, 48))])
def test_ghost_clipped_sum_equals_materialised_clipped_sum(phase, shape):
    """The step's clipped sum is the same whether the last layer's per-patient gradients are
    built or kept factored, with a clip that binds for some patients and not for others."""
    torch.manual_seed(1)
    engine = _engine()
    student = engine.student
    views = torch.randn(shape) * torch.linspace(0.2, 3.0, shape[0]).view(-1, *[1] * (len(shape) - 1))
    targets = per_sample_teacher_logits(engine.teacher, phase, views)
    loss, inputs = patient_step_loss(engine.loss_fn, phase), [views, *targets]
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    full, _ = per_sample_gradients(student, loss, inputs, params)
    ghost, _ = per_sample_gradients(student, loss, inputs, params, ghost=linear_layers(student))
    assert sum(isinstance(g, GhostFactors) for g in ghost.values()) >= 4
    plain = DPSGD(student, opt, 1.0, 1.0, 1.0)
    plain.clipped_sums(full, shape[0], params)
    norms = plain.per_sample_norms()
    clip = float(norms.median())
    assert (norms > clip).any() and (norms <= clip).any()
    a = DPSGD(student, opt, 1.0, clip, 1.0).clipped_sums(full, shape[0], params)
    ghosted = DPSGD(student, opt, 1.0, clip, 1.0, ghost=linear_layers(student))
    b = ghosted.clipped_sums(ghost, shape[0], params)
    assert torch.allclose(ghosted.per_sample_norms(), norms, rtol=1e-4)
    for name in params:
        scale = float(a[name].abs().max()) + 1e-12
        err = float((a[name] - b[name]).abs().max()) / scale
        assert err < 1e-4, f"{phase} {name}: relative error {err:.2e}"


def test_ghost_layer_must_be_a_linear():
    engine = _engine()
    opt = torch.optim.SGD(engine.student.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="needs an nn.Linear; head.mlp is Sequential"):
        DPSGD(engine.student, opt, 1.0, 1.0, 1.0, ghost=("head.mlp",))
