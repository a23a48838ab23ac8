"""Collapse watch: is the teacher still saying something?

Self-distillation has two trivial solutions (DINO paper, section 5.3): every image maps to the same
prototype (the batch-mean teacher distribution has entropy near 0, "dimension collapse"), or every
image maps to the uniform distribution (per-sample teacher entropy near log(out_dim), "uniform
collapse"). Both can make the loss fall, so a falling loss alone is not progress. A third failure
is slower and does not need a falling loss: the teacher drifts towards the uniform distribution
and gives every sample of a batch the same distribution (batch-mean entropy ~= per-sample entropy:
it does not tell the samples apart), while the loss rises towards log(out_dim).

We log the teacher's mean per-sample entropy, the entropy of its batch-mean distribution and
KL(teacher || student). :class:`CollapseWatch` warns

- ``dimension``: the loss falls while the batch-mean entropy stays below ``BATCH_ENTROPY_FLOOR``
  x log(out_dim) for a whole window;
- ``uniform``: the per-sample entropy is above ``UNIFORM_FRACTION`` x log(out_dim) while the loss
  falls, or above ``UNIFORM_DRIFT_FRACTION`` x log(out_dim) for a whole window, whatever the loss
  does;
- ``no-spread``: batch-mean minus per-sample entropy (the information the teacher's output carries
  about which sample it saw) stays below ``MIN_SPREAD_NATS`` for a whole window, whatever the loss
  does.

"A whole window" is ``window`` consecutive logged points, so a single noisy batch never warns: a
CT batch of two tiles whose regions happen to look alike legitimately lands on one prototype.
Every sign is kept per kind of step (``phase``): X-ray and CT losses have different scales (the CT
loss sums four terms), so a trend or a streak across a phase switch would compare unlike things.
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
# Per-sample entropy above this fraction of log(out_dim) while the loss falls: uniform collapse.
UNIFORM_FRACTION = 0.98
# Per-sample entropy above this fraction of log(out_dim) for a whole window: uniform drift
# (measured: the drifting micro X-ray runs sat at 0.97-0.995; healthy DINO teachers end far lower).
UNIFORM_DRIFT_FRACTION = 0.95
# Batch-mean minus per-sample entropy below this (nats) for a whole window: the teacher gives
# every sample the same distribution. The gap is the mutual information between the sample and
# the teacher's prototype, at most log(number of views in the batch).
MIN_SPREAD_NATS = 0.1


@dataclass(frozen=True)
class CollapseStats:
    """Entropies in nats; ``kl`` is KL(teacher || student) averaged over cross-view pairs."""

    teacher_entropy: float
    batch_entropy: float
    kl: float

    @property
    def spread(self) -> float:
        """Batch-mean minus per-sample teacher entropy: how much the output depends on the input."""
        return self.batch_entropy - self.teacher_entropy


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)


@torch.no_grad()
def collapse_stats(student_out: Sequence[Tensor], teacher_out: Sequence[Tensor], center: Tensor,
                   student_temp: float, teacher_temp: float,
                   teacher_probs: Sequence[Tensor] | None = None) -> CollapseStats:
    """Collapse indicators of one step from the per-view logits the loss saw.

    ``teacher_probs`` are the targets the loss used, when they are not the centred softmax
    (Sinkhorn-Knopp centring, :meth:`DINOLoss.teacher_targets`); ``center`` is then unused.
    """
    if teacher_probs is not None:
        tp = [p.detach().float() for p in teacher_probs]
    else:
        tp = [F.softmax((t.detach().float() - center) / teacher_temp, dim=-1)
              for t in teacher_out]
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
    """Warns (once per kind and phase, then again only after recovery) when the teacher collapses.

    Args:
        out_dim: head width; log(out_dim) is the entropy of the uniform distribution.
        window: number of logged points of one phase whose loss trend is compared (first vs
            second half), and how many consecutive logged points of that phase a sign needs.
    """

    def __init__(self, out_dim: int, window: int = 20) -> None:
        self.max_entropy = math.log(out_dim)
        self.window = max(window, 2)
        self.losses: dict[str, deque[float]] = {}
        self.active: set[tuple[str, str]] = set()
        self.streak: dict[tuple[str, str], int] = {}

    def loss_falling(self, phase: str = "") -> bool:
        values = list(self.losses.get(phase, ()))
        if len(values) < self.window:
            return False
        half = self.window // 2
        first, second = sum(values[:half]) / half, sum(values[half:]) / (len(values) - half)
        return second < first

    def _sustained(self, phase: str, kind: str, present: bool) -> bool:
        key = (phase, kind)
        self.streak[key] = self.streak.get(key, 0) + 1 if present else 0
        return self.streak[key] >= self.window

    def _signs(self, phase: str, stats: CollapseStats, falling: bool) -> dict[str, bool]:
        h_max = self.max_entropy
        low = stats.batch_entropy < BATCH_ENTROPY_FLOOR * h_max
        dimension = self._sustained(phase, "dimension", low)
        drifting = self._sustained(phase, "uniform",
                                   stats.teacher_entropy > UNIFORM_DRIFT_FRACTION * h_max)
        flat = self._sustained(phase, "no-spread", not low and stats.spread < MIN_SPREAD_NATS)
        return {
            "dimension": falling and dimension,
            "uniform": drifting or (falling and stats.teacher_entropy > UNIFORM_FRACTION * h_max),
            "no-spread": flat,
        }

    def _message(self, step: int, phase: str, kind: str, stats: CollapseStats) -> str:
        what = {
            "dimension": f"loss is falling but the teacher puts every sample on the same "
                         f"prototype(s) (dimension collapse: batch-mean entropy below "
                         f"{BATCH_ENTROPY_FLOOR:.2f} x log(out_dim) for {self.window} logged steps)",
            "uniform": f"the teacher is (drifting to) the uniform distribution (per-sample "
                       f"entropy above {UNIFORM_DRIFT_FRACTION:.2f} x log(out_dim) for "
                       f"{self.window} logged steps, or above {UNIFORM_FRACTION:.2f} x while the "
                       f"loss falls)",
            "no-spread": f"the teacher gives every sample the same distribution (batch-mean "
                         f"minus per-sample entropy below {MIN_SPREAD_NATS} nats for "
                         f"{self.window} logged steps): it does not tell the samples apart",
        }[kind]
        where = f" in {phase} steps" if phase else ""
        return (f"step {step}: teacher collapse ({kind}){where}: {what}: per-sample entropy "
                f"{stats.teacher_entropy:.3f}, batch-mean entropy {stats.batch_entropy:.3f}, "
                f"log(out_dim) {self.max_entropy:.3f}, KL {stats.kl:.4f}. This is failure, not "
                f"progress, whatever the loss does: check the views (do two views of one image "
                f"share more than two images do?), the lr, the teacher momentum, the "
                f"temperatures and center_momentum.")

    def update(self, step: int, loss: float, stats: CollapseStats, phase: str = "") -> list[str]:
        """Record one logged step of ``phase`` ("2d"/"3d"; "" when there is one kind of step);
        returns (and logs as WARNING) any new collapse warnings."""
        self.losses.setdefault(phase, deque(maxlen=self.window)).append(loss)
        messages = []
        for kind, present in self._signs(phase, stats, self.loss_falling(phase)).items():
            if present and (phase, kind) not in self.active:
                self.active.add((phase, kind))
                msg = self._message(step, phase, kind, stats)
                log.warning(msg)
                messages.append(msg)
            elif not present:
                self.active.discard((phase, kind))
        return messages
