"""``StepContext``: what a :class:`~fed_unimiss.ssl.gradient_step.GradientStep` may use of the
engine, passed to every hook instead of the engine itself.

The step reads and updates these objects (the student's weights, the optimizer's state, the DINO
center) but never the engine's bookkeeping; the engine builds a fresh context for every
``train_steps`` call, so a scaler or optimizer the caller replaced between calls is the one used.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from fed_unimiss.models import UniMiSSNet
from fed_unimiss.runtime import autocast
from fed_unimiss.ssl.config import SSLConfig
from fed_unimiss.ssl.dino_loss import DINOLoss
from fed_unimiss.ssl.schedules import Schedules
from fed_unimiss.ssl.steps import StepOutput, ct_step_loss, xray_step_loss

__all__ = ["StepContext"]


@dataclass(frozen=True)
class StepContext:
    """The networks, loss, optimizer and settings one training step works with."""

    student: UniMiSSNet
    teacher: UniMiSSNet          # EMA of the student; the step only runs it, never trains it
    loss_fn: DINOLoss            # holds the shared DINO center
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    schedules: Schedules
    cfg: SSLConfig
    device: torch.device
    precision: str
    params_3d: list[torch.nn.Parameter]  # the student's 3D-specific tensors (out of X-ray steps)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The forward's mixed-precision context (a no-op in fp32)."""
        return autocast(self.device, self.precision)

    def step_loss(self, phase: str, views: list[Tensor], update_center: bool = True,
                  teacher_out: list[Tensor] | None = None) -> StepOutput:
        """The batch loss of one plain step (:mod:`fed_unimiss.ssl.steps`)."""
        loss = xray_step_loss if phase == "2d" else ct_step_loss
        return loss(self.student, self.teacher, self.loss_fn, views, update_center=update_center,
                    koleo_weight=self.cfg.koleo_weight, teacher_out=teacher_out)
