"""The loss of one 2D (X-ray) step and one 3D (CT) step: the only loss code of both gradient steps.

The plain step back-propagates the batch loss (:func:`xray_step_loss`, :func:`ct_step_loss`); the
DP step (:mod:`fed_unimiss.ssl.dp_step`) differentiates :func:`patient_step_loss`, the same terms
for one patient, once per patient. Both build their terms from the same helpers, so the two
cannot drift. Contract that keeps the terms usable under DP-SGD (per-sample gradients come from
the batch dimension of every student forward):

- the student sees each view in its own forward, batch = samples; views are never concatenated
  along the batch for the student (for the teacher, which has no gradients, they are);
- a CT view's slices go through the student as one (B x D)-image batch, which mixes slices of the
  same sample only: under ``vmap`` B is 1, so one patient stays one gradient row.

The batch losses return a :class:`StepOutput`; the caller does backward, clipping and the update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_unimiss.ssl.collapse import CollapseStats, collapse_stats
from fed_unimiss.ssl.dino_loss import DINOLoss, koleo_loss

__all__ = ["StepOutput", "slice_logits", "teacher_logits", "ct_terms", "center_updates",
           "xray_step_loss",
           "ct_step_loss", "per_sample_teacher_logits", "patient_step_loss"]


@dataclass
class StepOutput:
    """Loss to back-propagate, its named terms, and the collapse indicators of the step."""

    loss: Tensor
    parts: dict[str, float] = field(default_factory=dict)
    collapse: CollapseStats | None = None


def slice_logits(net: nn.Module | Callable[[Tensor], Tensor], volume: Tensor) -> Tensor:
    """Head logits of a volume's slices through the 2D path, averaged over the slices.

    Args:
        net: a UniMiSSNet (student or teacher), or a per-sample forward of one.
        volume: (B, 1, D, H, W); each slice is repeated to 3 channels like an X-ray.

    Returns:
        (B, out_dim), the mean over the D slices of each sample.
    """
    b, _, d, h, w = volume.shape
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


def teacher_logits(teacher: nn.Module, phase: str, images: Tensor) -> list[Tensor]:
    """Teacher logits of a batch of views, no gradient: [volume] (2D) or [volume, slice-mean] (3D).

    There is no backpropagation through the teacher, so one batched forward serves every view.
    """
    with torch.no_grad():
        out = [teacher(images)]
        if phase == "3d":
            out.append(slice_logits(teacher, images))
    return out


def ct_terms(loss_fn: DINOLoss, s_vol: list[Tensor], s_slc: list[Tensor], t_vol: list[Tensor],
             t_slc: list[Tensor], update_center: bool) -> dict[str, Tensor]:
    """UniMiSS volume-slice consistency: the four DINO terms (student output -> teacher target).

    Each term updates the shared center in this order when ``update_center``, as the reference
    does.
    """
    return {
        "loss_volume": loss_fn(s_vol, t_vol, update_center=update_center),
        "loss_slice_volume": loss_fn(s_slc, t_vol, update_center=update_center),
        "loss_slice": loss_fn(s_slc, t_slc, update_center=update_center),
        "loss_volume_slice": loss_fn(s_vol, t_slc, update_center=update_center),
    }


def center_updates(phase: str, teacher_out: list[Tensor]) -> list[Tensor]:
    """The teacher logits each center update of a step pools, in the order the step makes them:
    one for an X-ray step, four for a CT step (:func:`ct_terms`: volume, volume, slice-mean,
    slice-mean). ``teacher_out`` is :func:`teacher_logits` of the step's views."""
    if phase == "2d":
        return [teacher_out[0]]
    t_vol, t_slc = teacher_out
    return [t_vol, t_vol, t_slc, t_slc]


def xray_step_loss(student: nn.Module, teacher: nn.Module, loss_fn: DINOLoss,
                   views: list[Tensor], *, update_center: bool = True,
                   koleo_weight: float = 0.0, teacher_out: list[Tensor] | None = None
                   ) -> StepOutput:
    """Two-view DINO loss of an X-ray batch; ``views`` are [(B, 3, S, S)] x 2.

    ``koleo_weight`` > 0 adds the KoLeo term of the student's head bottleneck (not DP-safe).
    ``teacher_out``: :func:`teacher_logits` of these views, if already computed.
    """
    center = loss_fn.center.clone()
    t_all = teacher_out or teacher_logits(teacher, "2d", torch.cat(views))
    t_out = list(t_all[0].chunk(len(views)))
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
                 *, update_center: bool = True, koleo_weight: float = 0.0,
                 teacher_out: list[Tensor] | None = None) -> StepOutput:
    """UniMiSS volume-slice consistency (:func:`ct_terms`) on [(B, 1, D, H, W)] x 2 views.

    volume->volume, slice-mean->volume, slice-mean->slice-mean and volume->slice-mean, summed
    unweighted. ``koleo_weight`` > 0 adds the KoLeo term of the student's volume bottleneck (not
    DP-safe).
    """
    center = loss_fn.center.clone()
    t_vol, t_slc = (list(t.chunk(len(views)))
                    for t in teacher_out or teacher_logits(teacher, "3d", torch.cat(views)))
    targets = loss_fn.teacher_targets(t_vol)  # before the loss moves the center
    s_vol, koleo = _student_views(student, views, koleo_weight)
    s_slc = [slice_logits(student, v) for v in views]
    terms = ct_terms(loss_fn, s_vol, s_slc, t_vol, t_slc, update_center)
    loss = sum(terms.values())
    if koleo is not None:
        terms["loss_koleo"] = koleo
        loss = loss + koleo
    stats = collapse_stats(s_vol, t_vol, center, loss_fn.student_temp, loss_fn.teacher_temp,
                           targets)
    parts = {k: float(v.detach()) for k, v in terms.items()}
    parts["loss_3d"] = float(loss.detach())  # includes the KoLeo term if any
    return StepOutput(loss, parts, stats)


def per_sample_teacher_logits(teacher: nn.Module, phase: str, views: Tensor) -> list[Tensor]:
    """Teacher logits per patient for :func:`patient_step_loss`: [(B, V, K)] (2D) or two (3D).

    ``views`` is (B, V, C, ...), the V views of each of B patients.
    """
    b, v = views.shape[:2]
    flat = views.reshape(b * v, *views.shape[2:])  # view-major rows of every patient
    return [t.view(b, v, -1) for t in teacher_logits(teacher, phase, flat)]


def patient_step_loss(loss_fn: DINOLoss, phase: str) -> Callable[..., Tensor]:
    """One patient's whole step loss: the function whose gradient is one DP-SGD row.

    ``loss(forward, views, *targets)`` takes the student forward, the patient's (V, C, ...)
    views and its teacher logits (V, K) from :func:`per_sample_teacher_logits`; each view is a
    batch of one through the same terms as :func:`xray_step_loss` / :func:`ct_step_loss`, with no
    center update (the DP step moves the center itself, or not at all). No KoLeo: it compares
    patients.
    """

    def loss(forward: Callable[[Tensor], Tensor], views: Tensor, *targets: Tensor) -> Tensor:
        n = views.shape[0]
        one = [views[i:i + 1] for i in range(n)]
        t_vol, *t_slc = ([t[i:i + 1] for i in range(n)] for t in targets)
        s_vol = [forward(v) for v in one]
        if phase == "2d":
            return loss_fn(s_vol, t_vol, update_center=False)
        s_slc = [slice_logits(forward, v) for v in one]
        return sum(ct_terms(loss_fn, s_vol, s_slc, t_vol, t_slc[0], update_center=False).values())

    return loss
