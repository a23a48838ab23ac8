"""DINO cross-entropy with one shared, centred teacher distribution.

Follows DINO (Caron et al. 2021, facebookresearch/dino ``DINOLoss``) as used by UniMiSS: the
teacher's logits are centred (minus a running mean, the *center*) and sharpened (temperature 0.04),
the student's are softened (0.1), and the loss is the cross-entropy between every teacher view and
every *other* student view. ``centering="sinkhorn"`` replaces the centring of the teacher by three
Sinkhorn-Knopp iterations over the batch (SwAV / DINOv2 ``sinkhorn_knopp_teacher``): the targets of
a batch are forced to use the prototypes evenly, so they cannot all drift to the same (uniform or
one-hot) distribution. It is a micro-recipe option for tiny batches (docs/pretraining.md); it mixes
the samples of a batch in the targets, so it is not for DP-SGD, whose per-sample losses see a
batch of one. UniMiSS keeps one center for 2D, 3D and slice-averaged outputs, so a CT
step calls the loss four times and moves the center four times (as the reference does).

Differences to the DINO code: views arrive as a list of per-view tensors (never one concatenated
student batch, which would break per-sample gradients for DP-SGD), the teacher temperature is
constant (as in UniMiSS), the loss is computed in fp32 under mixed precision, and the center
and the Sinkhorn-Knopp marginals are all-reduced only when a process group exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOLoss", "sinkhorn_knopp", "koleo_loss", "CENTERINGS"]

CENTERINGS = ("center", "sinkhorn")


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Balanced soft assignment of a batch (B, K) of logits to K prototypes, rows sum to 1.

    Alternately normalises the prototype marginals to 1/K and the sample marginals to 1/B,
    starting from softmax(logits / temp). The maximum is subtracted first (exp overflows
    otherwise at temperature 0.04).
    """
    scores = logits.detach().float() / temp
    top = scores.max()
    _all_reduce(top, maximum=True)
    q = torch.exp(scores - top).t()  # (K, B)
    k = q.shape[0]
    b = torch.tensor(float(q.shape[1]), device=q.device)
    _all_reduce(b)  # with several processes the batch is all ranks' samples
    total = q.sum()
    _all_reduce(total)
    q = q / total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        _all_reduce(rows)
        q = q / rows.clamp_min(1e-30) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / b
    return (q * b).t()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(t: Tensor, maximum: bool = False) -> None:
    """Sum (or maximum) over data-parallel processes, in place; nothing with one process."""
    if _distributed():
        op = torch.distributed.ReduceOp.MAX if maximum else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(t, op=op)


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo regulariser (DINOv2, Sablayrolles et al. 2019): -mean log nearest-neighbour distance.

    ``features`` (B, D) are L2-normalised first. Minimising it spreads the batch's embeddings
    over the sphere, so a student cannot answer every image with the same vector: the micro
    network starts nearly input-invariant (docs/pretraining.md) and DINO alone let it stay so.
    The engine applies it to the head's bottleneck (``fed_unimiss.ssl.steps``).
    It mixes the samples of a batch (each term looks at its nearest neighbour), so it is not a
    per-sample loss and DP-SGD runs must keep its weight 0. A batch of one gives 0.
    """
    if features.ndim != 2:
        raise ValueError(f"koleo_loss expects (B, D) features, got {tuple(features.shape)}")
    if features.shape[0] < 2:
        return features.new_zeros(())
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():  # the neighbour choice is not differentiated (as DINOv2)
        sims = x @ x.t()
        sims.fill_diagonal_(-2.0)
        nearest = sims.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


class DINOLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher views and the other student views.

    Args:
        out_dim: width of the head output (number of prototypes).
        student_temp: student softmax temperature (0.1).
        teacher_temp: teacher softmax temperature (0.04).
        center_momentum: EMA momentum of the center (0.9).
        centering: ``"center"`` (DINO / UniMiSS) or ``"sinkhorn"`` (see the module docstring).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (DINOv2 uses 3).

    The center is a registered buffer of shape (1, out_dim), so it is part of ``state_dict``,
    checkpointed, and - in a federation - aggregated like a shared tensor.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9, centering: str = "center",
                 sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering: expected one of {CENTERINGS}, got {centering!r}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        # Kept (and still updated) with Sinkhorn-Knopp too: it is exchanged state either way.
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._schedule: list[Tensor] | None = None  # see scheduled_centers
        self._call = 0

    def teacher_probs(self, teacher_logits: Tensor) -> Tensor:
        """Centred and sharpened teacher distribution of one view, gradient stopped."""
        center = self._current_center()
        return F.softmax((teacher_logits.detach().float() - center) / self.teacher_temp, dim=-1)

    def forward(self, student_out: Sequence[Tensor], teacher_out: Sequence[Tensor],
                update_center: bool = True) -> Tensor:
        """Mean over (teacher view i, student view j != i) of the batch-mean cross-entropy.

        Args:
            student_out: one (B, out_dim) logit tensor per view.
            teacher_out: one (B, out_dim) logit tensor per view, same order and batch.
            update_center: move the center towards this call's teacher batch mean (after the
                loss is computed, as DINO does); False for evaluation.
        """
        if len(student_out) != len(teacher_out) or len(student_out) < 2:
            raise ValueError(f"DINOLoss needs the same number (>= 2) of student and teacher "
                             f"views, got {len(student_out)} and {len(teacher_out)}")
        # The softmaxes and cross-entropies run in fp32 whatever the forward's autocast dtype.
        student_out = [s.float() for s in student_out]
        teacher_out = [t.float() for t in teacher_out]
        total = student_out[0].new_zeros(())
        n_terms = 0
        teacher_p = self.teacher_targets(teacher_out)
        for i, q in enumerate(teacher_p):
            for j, s in enumerate(student_out):
                if i == j:  # the same view on both sides teaches nothing
                    continue
                ce = torch.sum(-q * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
                total = total + ce.mean()
                n_terms += 1
        if update_center:
            self.update_center(teacher_out)
        return total / n_terms

    @torch.no_grad()
    def teacher_targets(self, teacher_out: Sequence[Tensor]) -> list[Tensor]:
        """The per-view target distributions the loss uses (centred softmax or Sinkhorn-Knopp).

        Sinkhorn-Knopp balances all views of the call together, as DINOv2 does for its global
        crops; the plain path centres each view with the running center.
        """
        if self.centering == "center":
            return [self.teacher_probs(t) for t in teacher_out]
        sizes = [t.shape[0] for t in teacher_out]
        q = sinkhorn_knopp(torch.cat(list(teacher_out)), self.teacher_temp,
                           self.sinkhorn_iterations)
        return list(q.split(sizes))

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[Tensor]) -> None:
        """EMA of the teacher's batch-mean logits (all views pooled)."""
        logits = torch.cat([t.detach().float() for t in teacher_out])
        batch_sum = logits.sum(dim=0, keepdim=True)
        count = torch.tensor(float(logits.shape[0]), device=logits.device)
        if self._schedule is not None:  # inside scheduled_centers: the center is precomputed
            self._call += 1
            return
        _all_reduce(batch_sum)
        _all_reduce(count)
        self.update_center_to(batch_sum / count)

    # ---- gradient accumulation: the centers of a whole batch, used by its micro-batches ----
    @torch.no_grad()
    def center_schedule(self, updates: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """The center before each of a step's center updates, and after the last.

        ``updates`` holds, per update of the step in order, the teacher logits' row sum and row
        count over the whole (local) batch; they are all-reduced over data-parallel processes.
        The result is what the sequence of :meth:`update_center` calls of one big batch gives.
        """
        centers = [self.center.clone()]
        for batch_sum, count in updates:
            batch_sum, count = batch_sum.clone(), count.clone()
            _all_reduce(batch_sum)
            _all_reduce(count)
            m = self.center_momentum
            centers.append(centers[-1] * m + (batch_sum / count).to(self.center) * (1 - m))
        return centers

    @contextlib.contextmanager
    def scheduled_centers(self, centers: list[Tensor]) -> Iterator[DINOLoss]:
        """Micro-batches of one step see the centers one big batch would have seen.

        Inside, the i-th center update of each micro-batch (:meth:`restart_schedule` starts a
        micro-batch) centres its targets with ``centers[i]`` and moves nothing; on a clean exit
        the center becomes ``centers[-1]`` (:meth:`center_schedule`).
        """
        self._schedule, self._call = centers, 0
        try:
            yield self
        finally:
            self._schedule = None
        self.center.copy_(centers[-1])

    def restart_schedule(self) -> None:
        self._call = 0

    def _current_center(self) -> Tensor:
        return self.center if self._schedule is None else self._schedule[self._call]

    @torch.no_grad()
    def update_center_to(self, batch_center: Tensor) -> None:
        """One EMA step of the center towards ``batch_center`` (1, out_dim).

        The DP step calls it with a clipped, noised mean of per-patient teacher logits instead of
        the batch mean, so both centers move by the same rule.
        """
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center.to(self.center) * (1 - m))
