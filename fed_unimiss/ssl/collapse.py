"""Collapse watch: is the teacher still saying something?

Self-distillation has two trivial solutions (DINO paper, section 5.3): every image maps to the same
prototype (the batch-mean teacher distribution has entropy near 0, "dimension collapse"), or every
image maps to the uniform distribution (per-sample teacher entropy near log(out_dim), "uniform
collapse"). Both make the loss fall, so a falling loss alone is not progress. We log the teacher's
mean per-sample entropy, the entropy of its batch-mean distribution and KL(teacher || student);
:class:`CollapseWatch` warns when the loss falls while one of the two collapse signs appears.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CollapseStats", "collapse_stats", "CollapseWatch"]

log = logging.getLogger(__name__)

# Batch-mean entropy below this fraction of log(out_dim): (nearly) one prototype for everything.
BATCH_ENTROPY_FLOOR = 0.1
# Per-sample entropy above this fraction of log(out_dim): the teacher is (nearly) uniform.
UNIFORM_FRACTION = 0.98


@dataclass(frozen=True)
class CollapseStats:
    """Entropies in nats; ``kl`` is KL(teacher || student) averaged over cross-view pairs."""

    teacher_entropy: float
    batch_entropy: float
    kl: float


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)


@torch.no_grad()
def collapse_stats(student_out: Sequence[Tensor], teacher_out: Sequence[Tensor], center: Tensor,
                   student_temp: float, teacher_temp: float) -> CollapseStats:
    """Collapse indicators of one step from the per-view logits the loss saw."""
    tp = [F.softmax((t.detach().float() - center) / teacher_temp, dim=-1) for t in teacher_out]
    slog = [F.log_softmax(s.detach().float() / student_temp, dim=-1) for s in student_out]
    per_sample = torch.cat([_entropy(p) for p in tp]).mean()
    batch = _entropy(torch.cat(tp).mean(dim=0))
    kls = []
    for i, p in enumerate(tp):
        for j, ls in enumerate(slog):
            if i != j:
                kls.append((p * (torch.log(p.clamp_min(1e-12)) - ls)).sum(dim=-1).mean())
    kl = torch.stack(kls).mean() if kls else torch.zeros(())
    return CollapseStats(float(per_sample), float(batch), float(kl))


class CollapseWatch:
    """Warns (once per kind, then again only after recovery) when loss falls into a collapse.

    Args:
        out_dim: head width; log(out_dim) is the entropy of the uniform distribution.
        window: number of logged points whose loss trend is compared (first vs second half).
    """

    def __init__(self, out_dim: int, window: int = 20) -> None:
        self.max_entropy = math.log(out_dim)
        self.window = max(window, 2)
        self.losses: deque[float] = deque(maxlen=self.window)
        self.active: set[str] = set()

    def loss_falling(self) -> bool:
        if len(self.losses) < self.window:
            return False
        half = self.window // 2
        values = list(self.losses)
        first, second = sum(values[:half]) / half, sum(values[half:]) / (len(values) - half)
        return second < first

    def update(self, step: int, loss: float, stats: CollapseStats) -> list[str]:
        """Record one logged step; returns (and logs as WARNING) any new collapse warnings."""
        self.losses.append(loss)
        falling = self.loss_falling()
        signs = {
            "dimension": stats.batch_entropy < BATCH_ENTROPY_FLOOR * self.max_entropy,
            "uniform": stats.teacher_entropy > UNIFORM_FRACTION * self.max_entropy,
        }
        messages = []
        for kind, present in signs.items():
            if falling and present and kind not in self.active:
                self.active.add(kind)
                msg = (f"step {step}: loss is falling but the teacher looks collapsed ({kind}): "
                       f"per-sample entropy {stats.teacher_entropy:.3f}, batch-mean entropy "
                       f"{stats.batch_entropy:.3f}, log(out_dim) {self.max_entropy:.3f}, "
                       f"KL {stats.kl:.4f}. This is failure, not progress: check the "
                       f"temperatures, center_momentum and the views.")
                log.warning(msg)
                messages.append(msg)
            elif not present:
                self.active.discard(kind)
        return messages
