"""SelfDistillation on real phantom files (micro preset): EMA, center, freezing, checkpoints,
resume equality, bad data and non-finite losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_unimiss.checkpoint import load_checkpoint, save_checkpoint
from fed_unimiss.models import dimension_of
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.site_data import SiteData


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_teacher_starts_as_student_and_stays_an_exact_ema(site_data, recipe_factory):
    engine = SelfDistillation(recipe_factory(), total_steps=8)
    for (n, ps), pt in zip(engine.student.named_parameters(), engine.teacher.parameters(), strict=True):
        assert torch.equal(ps, pt), n
        assert not pt.requires_grad
    teacher0 = dict(engine.teacher.named_parameters())
    teacher0 = {k: v.detach().clone() for k, v in teacher0.items()}
    engine.train_steps(site_data, 0, 1)
    m = engine.schedules.momentum_at(0)
    student = dict(engine.student.named_parameters())
    changed = 0
    for name, pt in engine.teacher.named_parameters():
        expected = m * teacher0[name] + (1 - m) * student[name].detach()
        torch.testing.assert_close(pt.detach(), expected, rtol=0, atol=1e-7)
        changed += not torch.equal(pt.detach(), teacher0[name])
    assert changed > 0


def test_center_moves_by_the_teacher_batch_mean(site_data, recipe_factory):
    engine = SelfDistillation(recipe_factory(), total_steps=8)
    engine.loss_fn.center.normal_()
    c0 = engine.loss_fn.center.clone()
    views = engine.batch_at(site_data, "2d", 0, "views", 0).views  # step 0 is an X-ray step
    with torch.no_grad():
        t = engine.teacher(torch.cat(views))
    engine.train_steps(site_data, 0, 1)
    expected = 0.9 * c0 + 0.1 * t.mean(0, keepdim=True)
    torch.testing.assert_close(engine.loss_fn.center, expected, rtol=1e-5, atol=1e-6)


def test_ct_step_updates_the_center_four_times(site_data, recipe_factory):
    # steps_per_epoch 1, interval 1: step 1 is a CT step with four loss terms
    engine = SelfDistillation(recipe_factory(steps_per_epoch=1, alternate_interval=1), 8)
    c0 = engine.loss_fn.center.clone()
    stats = engine.train_steps(site_data, 1, 1)
    assert stats.history[0]["phase"] == "3d"
    assert {"loss_volume", "loss_slice_volume", "loss_slice", "loss_volume_slice"} <= set(
        stats.history[0])
    assert stats.samples_3d == 1 and stats.samples_2d == engine.cfg.view_depth
    assert not torch.equal(engine.loss_fn.center, c0)


def test_2d_steps_leave_every_3d_tensor_unchanged(site_data, recipe_factory):
    engine = SelfDistillation(recipe_factory(freeze_last_layer=0), total_steps=8)
    before = _snapshot(engine.student)
    stats = engine.train_steps(site_data, 0, 2)  # epoch 0: X-ray
    assert [h["phase"] for h in stats.history] == ["2d", "2d"]
    after = engine.student.state_dict()
    names_3d = [n for n in before if dimension_of(n) == "3d"]
    assert names_3d, "the micro model has no 3D-specific tensors?"
    for n in names_3d:
        assert torch.equal(before[n], after[n]), n
    assert any(not torch.equal(before[n], after[n]) for n in before if dimension_of(n) != "3d")


def test_last_layer_frozen_during_the_first_epoch(site_data, recipe_factory):
    engine = SelfDistillation(recipe_factory(freeze_last_layer=1, steps_per_epoch=2), 8)
    w0 = _snapshot(engine.student.head.last_layer)
    engine.train_steps(site_data, 0, 1)
    for k, v in engine.student.head.last_layer.state_dict().items():
        assert torch.equal(v, w0[k]), k
    engine.train_steps(site_data, 2, 1)  # epoch 1: the last layer trains
    assert any(not torch.equal(v, w0[k])
               for k, v in engine.student.head.last_layer.state_dict().items())


def test_checkpoint_round_trip(site_data, recipe_factory, tmp_path):
    recipe = recipe_factory()
    engine = SelfDistillation(recipe, total_steps=8)
    engine.train_steps(site_data, 0, 1)
    state = engine.state_dict()
    assert any(k.startswith("optim.") for k in state) and "center" in state
    save_checkpoint(tmp_path, "ckpt_00000001", state, {"step": 1})
    loaded, meta = load_checkpoint(tmp_path / "ckpt_00000001.safetensors")
    other = SelfDistillation(recipe, total_steps=8)
    other.load_state_dict(loaded)
    again = other.state_dict()
    assert set(again) == set(state)
    for k in state:
        assert torch.equal(again[k], state[k]), k


def test_load_exchange_state_names_the_problem(recipe_factory):
    engine = SelfDistillation(recipe_factory(), total_steps=8)
    state = engine.exchange_state()
    name = next(k for k in state if k.startswith("student."))
    bad = dict(state)
    bad.pop(name)
    bad["student.extra"] = torch.zeros(1)
    bad["center"] = torch.zeros(1, 3)
    with pytest.raises(ValueError) as err:
        engine.load_exchange_state(bad)
    msg = str(err.value)
    assert name in msg and "student.extra" in msg and "center: expected (1, 256)" in msg
    engine.load_exchange_state({k: v for k, v in state.items() if k != name}, strict=False)


def test_resume_equals_an_uninterrupted_run(site_data, recipe_factory):
    # steps_per_epoch 3, interval 1: steps 0-2 X-ray, 3-5 CT; stop mid-epoch at step 2
    recipe = recipe_factory(steps_per_epoch=3, alternate_interval=1)
    straight = SelfDistillation(recipe, total_steps=12)
    straight.train_steps(site_data, 0, 4)
    first = SelfDistillation(recipe, total_steps=12)
    first.train_steps(site_data, 0, 2)
    state = first.state_dict()
    resumed = SelfDistillation(recipe, total_steps=12)
    resumed.load_state_dict(state)
    stats = resumed.train_steps(site_data, 2, 2)
    assert [h["phase"] for h in stats.history] == ["2d", "3d"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_corrupt_cache_entries_are_skipped_and_counted(phantom_work, recipe_factory):
    from fed_unimiss.data.cache import SiteIndex

    index = SiteIndex.load(phantom_work)
    data = SiteData.from_index(index)
    engine = SelfDistillation(recipe_factory(batch_size_2d=len(data.xray)), total_steps=8)
    victim = index.xrays[0].path
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[:40])  # truncated .npy
        stats = engine.train_steps(data, 0, 1)
        assert stats.steps == 1 and stats.skipped == 1
        assert stats.samples_2d == len(data.xray) - 1
    finally:
        victim.write_bytes(original)


def test_an_all_bad_batch_is_skipped_not_fatal(recipe_factory):
    good = [torch.rand(1, 96, 96) for _ in range(2)]
    data = SiteData(xray=[None, torch.full((1, 96, 96), float("nan")), *good])
    engine = SelfDistillation(recipe_factory(batch_size_2d=2, steps_per_epoch=10), 8)
    stats = engine.train_steps(data, 0, 3)
    assert stats.skipped >= 2 and stats.empty_batches + stats.steps == 3
    assert stats.steps >= 1


def test_non_finite_loss_raises_naming_the_step(site_data, recipe_factory):
    engine = SelfDistillation(recipe_factory(), total_steps=8)
    with torch.no_grad():
        next(engine.student.head.mlp.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="global step 3"):
        engine.train_steps(site_data, 3, 1)


def test_evaluate_changes_nothing(site_data, recipe_factory):
    engine = SelfDistillation(recipe_factory(), total_steps=8)
    before = engine.state_dict()
    result = engine.evaluate(site_data, max_batches=1)
    assert np.isfinite(result["loss"]) and "loss_2d" in result and "loss_3d" in result
    after = engine.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in engine.student.parameters())


def test_sinkhorn_centering_is_used_by_the_engine(site_data, recipe_factory):
    """``teacher_centering: sinkhorn`` reaches the loss: the first step's targets use the
    prototypes evenly (batch-mean entropy ~ log K), which the centred softmax with a fresh zero
    center does not (it shows the logits' common component), and the center still moves."""
    import math

    xray = SiteData(xray=site_data.xray)
    plain = SelfDistillation(recipe_factory(batch_size_2d=4), total_steps=8)
    sk = SelfDistillation(recipe_factory(batch_size_2d=4, teacher_centering="sinkhorn"), 8)
    assert sk.loss_fn.centering == "sinkhorn"
    h_plain = plain.train_steps(xray, 0, 1).history[0]["batch_entropy"]
    h_sk = sk.train_steps(xray, 0, 1).history[0]["batch_entropy"]
    log_k = math.log(sk.recipe.model.head_out_dim)
    assert h_sk > 0.99 * log_k > h_plain + 0.1, (h_sk, h_plain, log_k)
    assert sk.loss_fn.center.abs().sum() > 0
