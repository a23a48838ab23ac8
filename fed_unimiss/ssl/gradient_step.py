"""How one optimizer step of :class:`~fed_unimiss.ssl.engine.SelfDistillation` is taken.

The engine owns what every step shares: the 2D/3D phase, the schedules, the teacher EMA and the
bookkeeping. A :class:`GradientStep` owns what differs between plain training and DP-SGD (each
hook receives a :class:`~fed_unimiss.ssl.step_context.StepContext`, never the engine itself):

- :meth:`~GradientStep.batch` which items the step trains on (the seeded stream position, or a
  Poisson sample of patients) and how their views are stacked;
- :meth:`~GradientStep.update` the loss, the gradient (batch backward, or per-patient rows with
  clipping and noise), the optimizer step, and what happens to the DINO center;
- :meth:`~GradientStep.begin` / :meth:`~GradientStep.end` per call of ``train_steps``;
- ``steps_on_empty``: whether a step with no usable item is still taken (DP-SGD must: the
  accountant counts every step).

:class:`PlainStep` is the ordinary DINO step; :class:`fed_unimiss.ssl.dp_step.DPStep` is DP-SGD.
Both compute their loss with :mod:`fed_unimiss.ssl.steps`, the only loss code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from fed_unimiss import exchange as ex
from fed_unimiss.ssl import distributed
from fed_unimiss.ssl.batches import Batch, stream_batch
from fed_unimiss.ssl.collapse import CollapseStats
from fed_unimiss.ssl.config import Recipe
from fed_unimiss.ssl.schedules import Phase
from fed_unimiss.ssl.site_data import SiteData
from fed_unimiss.ssl.step_context import StepContext
from fed_unimiss.ssl.steps import center_updates, teacher_logits
from fed_unimiss.ssl.train_stats import TrainStats

__all__ = ["StepResult", "GradientStep", "PlainStep", "clip_gradients", "check_finite",
           "micro_batches"]


@dataclass
class StepResult:
    """The loss of a step taken (NaN for an empty DP step) and what it measured on the way."""

    loss: float
    parts: dict[str, float] = field(default_factory=dict)
    collapse: CollapseStats | None = None


class GradientStep(Protocol):
    """The hooks the engine calls around and inside every step (see the module docstring)."""

    steps_on_empty: bool
    mixed_precision: bool  # may the forward run under bf16/fp16 autocast
    data_parallel: bool    # may several processes run it as one model

    def check_recipe(self, recipe: Recipe) -> None:
        """Raise ``ValueError`` if ``recipe`` cannot be trained with this step."""

    def begin(self, ctx: StepContext, data: SiteData) -> None:
        """Prepare a ``train_steps`` call on ``data``."""

    def batch(self, ctx: StepContext, data: SiteData, phase: Phase, position: int,
              step: int) -> Batch:
        """The items of global step ``step`` (``position``: its index in ``phase``'s stream)."""

    def update(self, ctx: StepContext, step: int, phase: Phase, batch: Batch
               ) -> StepResult:
        """Loss, gradient and optimizer step of the student (hyperparameters are already set)."""

    def end(self, ctx: StepContext) -> None:
        """Undo what :meth:`begin` changed on the context (called even after an error)."""

    def public_metrics(self, ctx: StepContext, data: SiteData, start_step: int,
                       num_steps: int, stats: TrainStats) -> dict[str, float]:
        """The counts and metrics of a ``train_steps`` call that may leave the site."""


def check_finite(loss: float, step: int, what: str) -> None:
    """Stop the run at a non-finite loss, naming the global step."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss}) at global step {step} ({what}); "
                                 "lower lr or check the data")


def check_finite_gradients(params: list[torch.nn.Parameter], step: int, what: str) -> None:
    """Stop the run before an optimizer step that would write NaN/inf into the weights."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
        raise FloatingPointError(f"non-finite gradient at global step {step} ({what}); lower "
                                 "lr, raise precision to fp32, or check the data")


def micro_batches(views: list[Tensor], parts: int) -> list[list[Tensor]]:
    """``views`` cut along the batch into at most ``parts`` micro-batches (gradient accumulation)."""
    n = views[0].shape[0]
    parts = max(1, min(parts, n))
    chunks = [v.tensor_split(parts) for v in views]
    return [[c[k] for c in chunks] for k in range(parts)]


@torch.no_grad()
def clip_gradients(model: torch.nn.Module, clip: float) -> None:
    """Per-tensor gradient-norm clipping (DINO's ``clip_gradients``)."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


@contextlib.contextmanager
def _whole_batch_centers(ctx: StepContext, phase: Phase, chunks: list[list[Tensor]]
                         ) -> Iterator[list[list[Tensor] | None]]:
    """Teacher logits of every micro-batch, and the DINO centers of the whole batch around them.

    One micro-batch (no accumulation): nothing precomputed, the loss moves the center itself.
    Several: the teacher runs first on every micro-batch (no gradients), the step's sequence of
    centers is computed from the whole batch (:meth:`DINOLoss.center_schedule`), and each
    micro-batch's loss centres its targets with them, so the gradient and the center are the
    whole batch's.
    """
    if len(chunks) == 1:
        yield [None]
        return
    with torch.no_grad(), ctx.autocast():
        teacher = [teacher_logits(ctx.teacher, phase, torch.cat(views)) for views in chunks]
    per_update = zip(*(center_updates(phase, t) for t in teacher), strict=True)
    sums = [(sum(x.float().sum(0, keepdim=True) for x in xs),
             torch.tensor(float(sum(x.shape[0] for x in xs)), device=xs[0].device))
            for xs in per_update]
    with ctx.loss_fn.scheduled_centers(ctx.loss_fn.center_schedule(sums)):
        yield teacher


class PlainStep:
    """DINO's step: the batch at the step's stream position, backward of the batch loss,
    per-tensor clipping, AdamW; the loss moves the center.

    With ``ssl.accumulate`` = K the batch is cut into K micro-batches whose weighted gradients add
    up to the whole batch's, with the whole batch's DINO centers (:func:`_whole_batch_centers`). With several processes the gradients are averaged
    over processes, weighted by their items, before clipping. In fp16 a gradient scaler skips
    steps whose gradients overflow (``amp_skipped`` in the step's metrics).
    """

    steps_on_empty = False
    mixed_precision = True
    data_parallel = True

    def check_recipe(self, recipe: Recipe) -> None:
        return None

    def begin(self, ctx: StepContext, data: SiteData) -> None:
        return None

    def end(self, ctx: StepContext) -> None:
        return None

    def batch(self, ctx: StepContext, data: SiteData, phase: Phase, position: int,
              step: int) -> Batch:
        return stream_batch(data, phase, position, "views", step, ctx.cfg, ctx.device)

    def update(self, ctx: StepContext, step: int, phase: Phase, batch: Batch
               ) -> StepResult:
        ctx.optimizer.zero_grad(set_to_none=True)
        chunks = micro_batches(batch.views, ctx.cfg.accumulate)
        loss, parts = 0.0, {}
        with _whole_batch_centers(ctx, phase, chunks) as teacher:
            for views, teacher_out in zip(chunks, teacher, strict=True):
                ctx.loss_fn.restart_schedule()
                weight = views[0].shape[0] / batch.size
                with ctx.autocast():
                    out = ctx.step_loss(phase, views, teacher_out=teacher_out)
                part_loss = float(out.loss.detach())
                check_finite(part_loss, step, f"{phase} step")
                ctx.scaler.scale(out.loss * weight).backward()
                loss += part_loss * weight
                for k, v in out.parts.items():
                    parts[k] = parts.get(k, 0.0) + v * weight
        params = list(ctx.student.parameters())
        distributed.average_gradients(params, batch.size, batch.total or batch.size)
        ctx.scaler.unscale_(ctx.optimizer)
        if phase == "2d":  # X-ray epochs: the 3D-specific tensors are frozen
            for p in ctx.params_3d:
                p.grad = None
        if not ctx.scaler.is_enabled():  # fp16: the scaler finds overflows and skips
            check_finite_gradients(params, step, f"{phase} step")
        if ctx.cfg.clip_grad > 0:
            clip_gradients(ctx.student, ctx.cfg.clip_grad)
        if ctx.schedules.last_layer_frozen(step):
            for p in ctx.student.head.last_layer.parameters():
                p.grad = None
        scale = ctx.scaler.get_scale() if ctx.scaler.is_enabled() else 1.0
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        if ctx.scaler.is_enabled():
            parts["amp_skipped"] = float(ctx.scaler.get_scale() < scale)
        ctx.student.head.renormalize_last_layer()
        loss = distributed.all_reduce_mean(loss, batch.size, ctx.device)
        return StepResult(loss, parts, out.collapse)

    def public_metrics(self, ctx: StepContext, data: SiteData, start_step: int,
                       num_steps: int, stats: TrainStats) -> dict[str, float]:
        """Samples trained on and the finite summary metrics (NaN = "not measured": not sent)."""
        out: dict[str, float] = {ex.SAMPLES_2D: int(stats.samples_2d),
                                 ex.SAMPLES_3D: int(stats.samples_3d),
                                 ex.NUM_EXAMPLES: int(stats.samples_2d) + int(stats.samples_3d)}
        for key in ex.TRAIN_METRICS:
            value = getattr(stats, key, None)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[key] = float(value)
        return out
