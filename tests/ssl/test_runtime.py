"""Device, precision and gradient accumulation of the one trainer.

bf16 runs on this CPU, so its path is tested here against fp32 on the same state and batch; fp16
runs on CPU too (with the gradient scaler). CUDA tests carry the ``gpu`` marker and run the same
functions on the GPU where one exists.
"""

from __future__ import annotations

import pytest
import torch

from fed_unimiss.privacy.config import PrivacyConfig
from fed_unimiss.runtime import Runtime, autocast, resolve_device
from fed_unimiss.ssl.config import recipe_from_dict
from fed_unimiss.ssl.dp_step import DPStep
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.gradient_step import micro_batches


def _loss_and_grads(engine: SelfDistillation, phase: str, views) -> tuple[float, dict]:
    engine.optimizer.zero_grad(set_to_none=True)
    with engine.autocast():
        out = engine.step_loss(phase, views, update_center=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in engine.student.named_parameters()
             if p.grad is not None}
    return float(out.loss.detach()), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ---------------------------------------------------------------------- device


def test_auto_is_cpu_here_and_a_missing_device_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu") or torch.cuda.is_available()
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="workers"):
        Runtime(workers=0).validate()
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Runtime(precision="fp8").validate()  # type: ignore[arg-type]


def test_everything_the_engine_creates_lives_on_its_device(site_data, recipe_factory):
    engine = SelfDistillation(recipe_factory(), 8, device="cpu", precision="bf16")
    engine.train_steps(site_data, 0, 3)
    tensors = [*engine.student.parameters(), *engine.teacher.parameters(),
               engine.loss_fn.center,
               *(v for st in engine.optimizer.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor) and v.ndim > 0)]
    assert {t.device.type for t in tensors} == {"cpu"}
    # fp32 master weights, optimizer state, EMA teacher and center, whatever the precision
    assert {t.dtype for t in tensors} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_steps_are_finite_and_stay_on_the_gpu(site_data, recipe_factory):
    engine = SelfDistillation(recipe_factory(), 8, device=resolve_device("cuda"),
                              precision="bf16")
    stats = engine.train_steps(site_data, 0, 4)
    assert torch.isfinite(torch.tensor(stats.loss))
    assert next(engine.student.parameters()).device.type == "cuda"
    assert engine.loss_fn.center.device.type == "cuda"
    assert all(v.device.type == "cpu" for v in engine.exchange_state().values())


# ---------------------------------------------------------------------- precision


@pytest.mark.parametrize("phase", ["2d", "3d"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_loss_and_gradients_agree_with_fp32(site_data, recipe_factory, phase, seed):
    """Stated tolerance, from the same state and batch: loss within 1 %, the whole student
    gradient within 8 % (relative L2) and at cosine >= 0.998 of fp32's. Measured over seeds
    0-4 on this CPU: loss <= 0.18 %, gradient <= 3.1 %, cosine >= 0.9996. Single tensors are
    not compared: bf16 keeps 8 mantissa bits and a conv weight's gradient sums thousands of
    positions, so small-gradient tensors differ by up to ~45 % while the update as a whole
    agrees."""
    recipe = recipe_factory(koleo_weight=0.0, seed=seed)
    fp32 = SelfDistillation(recipe, 8, precision="fp32")
    bf16 = SelfDistillation(recipe, 8, precision="bf16")
    bf16.load_state_dict(fp32.state_dict())
    batch = fp32.batch_at(site_data, phase, 0, "views", 0)
    loss32, g32 = _loss_and_grads(fp32, phase, batch.views)
    loss16, g16 = _loss_and_grads(bf16, phase, batch.views)
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32)
    assert g16.keys() == g32.keys()
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    assert _relative(flat16, flat32) < 0.08
    assert float(torch.nn.functional.cosine_similarity(flat16, flat32, dim=0)) >= 0.998


def test_bf16_and_fp16_training_stays_finite_and_learns_like_fp32(site_data, recipe_factory):
    """Measured for recipe seeds 0-2 at 1 and 2 threads: fp16 skipped at most 1 of 12 steps
    (never one of the last 4; bound 6), bf16's mean loss within 0.2 % of fp32's (bound 10 %)."""
    recipe = recipe_factory(epochs=6)
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        engine = SelfDistillation(recipe, 12, precision=precision)
        stats = engine.train_steps(site_data, 0, 12)
        assert stats.steps == 12
        losses[precision] = [m["loss"] for m in stats.history]
        assert all(torch.isfinite(torch.tensor(losses[precision])))
        assert all(torch.isfinite(v).all() for v in engine.exchange_state().values())
        if precision == "fp16":
            # the scaler may skip the first steps whose gradients overflow while it calibrates
            # (reported per step, never silent); after calibrating it steps every time
            skipped = [m["amp_skipped"] for m in stats.history]
            assert sum(skipped) <= 6 and skipped[-4:] == [0.0] * 4, skipped
    # the same data and steps: bf16 follows the fp32 loss curve
    mean32, mean16 = sum(losses["fp32"]) / 12, sum(losses["bf16"]) / 12
    assert abs(mean16 - mean32) < 0.1 * abs(mean32), (mean16, mean32)


def test_autocast_is_a_no_op_in_fp32():
    x = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16


def test_dp_refuses_mixed_precision_with_the_reason():
    recipe = recipe_from_dict({"model": {"preset": "micro", "head_out_dim": 256,
                                         "head_weight_norm": False},
                               "ssl": {"koleo_weight": 0.0, "steps_per_epoch": 2}})
    with pytest.raises(ValueError, match="precision bf16: DPStep trains in fp32 only"):
        SelfDistillation(recipe, 4, gradient_step=DPStep(PrivacyConfig(enabled=True), 1.0, 0),
                         precision="bf16")


# ---------------------------------------------------------------------- accumulation


def test_micro_batches_cover_the_batch_in_order():
    views = [torch.arange(5.0).view(5, 1), torch.arange(5.0, 10.0).view(5, 1)]
    parts = micro_batches(views, 2)
    assert [p[0].flatten().tolist() for p in parts] == [[0, 1, 2], [3, 4]]
    assert [p[1].flatten().tolist() for p in parts] == [[5, 6, 7], [8, 9]]
    assert len(micro_batches(views, 9)) == 5  # never an empty micro-batch


@pytest.mark.parametrize("phase", ["2d", "3d"])
def test_accumulation_reaches_the_whole_batch_update(site_data, recipe_factory, phase):
    """K micro-batches give the whole batch's gradient and the same center: the teacher runs on
    every micro-batch first and the loss terms use the whole batch's sequence of centers
    (DINOLoss.center_schedule). Equal up to float summation order."""
    base = dict(batch_size_2d=4, batch_size_3d=2, koleo_weight=0.0, freeze_last_layer=0,
                clip_grad=0.0)
    whole = SelfDistillation(recipe_factory(**base), 8)
    parts = SelfDistillation(recipe_factory(**base, accumulate=2), 8)
    parts.load_state_dict(whole.state_dict())
    step = 0 if phase == "2d" else 4  # the phantom site alternates 2 steps of each kind
    assert whole.schedules.phase(step, True, True) == phase
    for engine in (whole, parts):
        engine.train_steps(site_data, step, 1)  # the step's gradient stays in p.grad

    def gradient(engine: SelfDistillation) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in engine.student.parameters()
                          if p.grad is not None])

    assert _relative(gradient(parts), gradient(whole)) < 1e-4
    assert _relative(parts.loss_fn.center, whole.loss_fn.center) < 1e-5


def test_a_site_uses_only_the_workers_the_recipes_batches_can_feed(recipe_factory):
    from fed_unimiss.ssl.local_parallel import usable_workers

    assert usable_workers(recipe_factory(batch_size_2d=8, batch_size_3d=2), 4) == 2
    assert usable_workers(recipe_factory(batch_size_2d=8, batch_size_3d=1), 4) == 1
    assert usable_workers(recipe_factory(batch_size_2d=8, batch_size_3d=8, accumulate=2), 8) == 4
    assert usable_workers(recipe_factory(batch_size_2d=8, batch_size_3d=8), 2) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dp_steps_draw_their_noise_on_the_gpu(site_data):
    recipe = recipe_from_dict({"model": {"preset": "micro", "head_out_dim": 256,
                                         "head_weight_norm": False},
                               "data": {"xray_size": 96},
                               "ssl": {"koleo_weight": 0.0, "steps_per_epoch": 2, "crop_2d": 48,
                                       "view_depth": 8, "view_size": 48, "epochs": 4}})
    step = DPStep(PrivacyConfig(enabled=True, patients_per_step=2.0), 1.0, dp_seed=0)
    engine = SelfDistillation(recipe, 8, device=resolve_device("cuda"), gradient_step=step)
    stats = engine.train_steps(site_data, 0, 3)
    assert stats.steps == 3
    assert all(torch.isfinite(v).all() for v in engine.exchange_state().values())
