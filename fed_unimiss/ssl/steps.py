"""The loss of one 2D (X-ray) step and one 3D (CT) step, shared by the plain and the DP trainer.

Contract that keeps these usable under DP-SGD (Opacus computes per-sample gradients from the batch
dimension of every student forward):

- the student sees each view in its own forward, batch = samples; views are never concatenated
  along the batch for the student (for the teacher, which has no gradients, they are);
- with ``per_sample_safe=True`` the CT slices also go through the student one slice index at a
  time (batch = samples), instead of one (B x D)-image batch, so no forward mixes a sample's
  slices into the batch dimension.

Both functions return a :class:`StepOutput`; the caller does backward, clipping and the update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_unimiss.ssl.collapse import CollapseStats, collapse_stats
from fed_unimiss.ssl.dino_loss import DINOLoss, koleo_loss

__all__ = ["StepOutput", "slice_logits", "xray_step_loss", "ct_step_loss"]


@dataclass
class StepOutput:
    """Loss to back-propagate, its named terms, and the collapse indicators of the step."""

    loss: Tensor
    parts: dict[str, float] = field(default_factory=dict)
    collapse: CollapseStats | None = None


def slice_logits(net: nn.Module, volume: Tensor, per_sample_safe: bool = False) -> Tensor:
    """Head logits of a volume's slices through the 2D path, averaged over the slices.

    Args:
        net: a UniMiSSNet (student or teacher).
        volume: (B, 1, D, H, W); each slice is repeated to 3 channels like an X-ray.
        per_sample_safe: one forward per slice index (batch B) instead of one of B x D images.

    Returns:
        (B, out_dim), the mean over the D slices of each sample.
    """
    b, _, d, h, w = volume.shape
    if per_sample_safe:
        per_slice = [net(volume[:, :, i].expand(b, 3, h, w)) for i in range(d)]  # D x (B, K)
        return torch.stack(per_slice, dim=1).mean(dim=1)
    slices = volume.transpose(1, 2).reshape(b * d, 1, h, w).expand(b * d, 3, h, w)
    return net(slices).view(b, d, -1).mean(dim=1)  # (B, K)


def _student_views(student: nn.Module, views: list[Tensor], koleo_weight: float
                   ) -> tuple[list[Tensor], Tensor | None]:
    """Student logits, one forward per view (batch = samples), and the weighted KoLeo term.

    KoLeo acts on the head's bottleneck (the vector the prototypes read, before its L2
    normalisation), not on the backbone CLS as DINOv2 does: on the micro recipe the backbone
    version left the teacher's targets nearly sample-independent (docs/pretraining.md). The
    logits are computed exactly as ``DINOHead.forward`` does. None when ``koleo_weight`` is 0:
    then the plain forward is used.
    """
    if koleo_weight <= 0:
        return [student(v) for v in views], None
    logits, koleo = [], 0.0
    for v in views:
        z = student.head.mlp(student.backbone(v))  # (B, bottleneck)
        koleo = koleo + koleo_loss(z)
        logits.append(student.head.last_layer(F.normalize(z, dim=-1, p=2)))
    return logits, koleo_weight * koleo / len(views)


def _teacher_views(teacher: nn.Module, views: list[Tensor]) -> list[Tensor]:
    with torch.no_grad():  # no backprop through the teacher; one batched forward is fine
        return list(teacher(torch.cat(views)).chunk(len(views)))


def xray_step_loss(student: nn.Module, teacher: nn.Module, loss_fn: DINOLoss,
                   views: list[Tensor], *, update_center: bool = True,
                   koleo_weight: float = 0.0) -> StepOutput:
    """Two-view DINO loss of an X-ray batch; ``views`` are [(B, 3, S, S)] x 2.

    ``koleo_weight`` > 0 adds the KoLeo term of the student's head bottleneck (not DP-safe).
    """
    center = loss_fn.center.clone()
    t_out = _teacher_views(teacher, views)
    targets = loss_fn.teacher_targets(t_out)  # before the loss moves the center
    s_out, koleo = _student_views(student, views, koleo_weight)
    loss = loss_fn(s_out, t_out, update_center=update_center)
    parts = {"loss_2d": float(loss.detach())}
    if koleo is not None:
        parts["loss_koleo"] = float(koleo.detach())
        loss = loss + koleo
    stats = collapse_stats(s_out, t_out, center, loss_fn.student_temp, loss_fn.teacher_temp,
                           targets)
    return StepOutput(loss, parts, stats)


def ct_step_loss(student: nn.Module, teacher: nn.Module, loss_fn: DINOLoss, views: list[Tensor],
                 *, update_center: bool = True, per_sample_safe: bool = False,
                 koleo_weight: float = 0.0) -> StepOutput:
    """UniMiSS volume-slice consistency: four DINO terms on [(B, 1, D, H, W)] x 2 views.

    volume->volume, slice-mean->volume, slice-mean->slice-mean and volume->slice-mean (student
    output -> teacher target), summed unweighted. Each term updates the shared center in that
    order, as the reference does. ``koleo_weight`` > 0 adds the KoLeo term of the student's
    volume bottleneck (not DP-safe).
    """
    center = loss_fn.center.clone()
    with torch.no_grad():
        t_vol = _teacher_views(teacher, views)
        t_slc = list(slice_logits(teacher, torch.cat(views)).chunk(len(views)))
    targets = loss_fn.teacher_targets(t_vol)  # before the loss moves the center
    s_vol, koleo = _student_views(student, views, koleo_weight)
    s_slc = [slice_logits(student, v, per_sample_safe) for v in views]
    terms = {
        "loss_volume": loss_fn(s_vol, t_vol, update_center=update_center),
        "loss_slice_volume": loss_fn(s_slc, t_vol, update_center=update_center),
        "loss_slice": loss_fn(s_slc, t_slc, update_center=update_center),
        "loss_volume_slice": loss_fn(s_vol, t_slc, update_center=update_center),
    }
    loss = sum(terms.values())
    if koleo is not None:
        terms["loss_koleo"] = koleo
        loss = loss + koleo
    stats = collapse_stats(s_vol, t_vol, center, loss_fn.student_temp, loss_fn.teacher_temp,
                           targets)
    parts = {k: float(v.detach()) for k, v in terms.items()}
    parts["loss_3d"] = float(loss.detach())  # includes the KoLeo term if any
    return StepOutput(loss, parts, stats)
