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

- ``dimension``: the loss falls while the batch-mean entropy is below ``BATCH_ENTROPY_FLOOR`` x
  log(out_dim);
- ``uniform``: the per-sample entropy is above ``UNIFORM_FRACTION`` x log(out_dim) while the loss
  falls, or above ``UNIFORM_DRIFT_FRACTION`` x log(out_dim) for a whole window, whatever the loss
  does;
- ``no-spread``: batch-mean minus per-sample entropy (the information the teacher's output carries
  about which sample it saw) stays below ``MIN_SPREAD_NATS`` for a whole window, whatever the loss
  does.

"A whole window" is ``window`` consecutive logged points, so a single noisy batch never warns.
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
    """Warns (once per kind, then again only after recovery) when the teacher collapses.

    Args:
        out_dim: head width; log(out_dim) is the entropy of the uniform distribution.
        window: number of logged points whose loss trend is compared (first vs second half), and
            how many consecutive logged points a sustained sign (uniform drift, no spread) needs.
    """

    def __init__(self, out_dim: int, window: int = 20) -> None:
        self.max_entropy = math.log(out_dim)
        self.window = max(window, 2)
        self.losses: deque[float] = deque(maxlen=self.window)
        self.active: set[str] = set()
        self.streak = {"uniform": 0, "no-spread": 0}

    def loss_falling(self) -> bool:
        if len(self.losses) < self.window:
            return False
        half = self.window // 2
        values = list(self.losses)
        first, second = sum(values[:half]) / half, sum(values[half:]) / (len(values) - half)
        return second < first

    def _sustained(self, kind: str, present: bool) -> bool:
        self.streak[kind] = self.streak[kind] + 1 if present else 0
        return self.streak[kind] >= self.window

    def _signs(self, stats: CollapseStats, falling: bool) -> dict[str, bool]:
        h_max = self.max_entropy
        dimension = stats.batch_entropy < BATCH_ENTROPY_FLOOR * h_max
        drifting = self._sustained("uniform", stats.teacher_entropy > UNIFORM_DRIFT_FRACTION * h_max)
        flat = self._sustained("no-spread", not dimension and stats.spread < MIN_SPREAD_NATS)
        return {
            "dimension": falling and dimension,
            "uniform": drifting or (falling and stats.teacher_entropy > UNIFORM_FRACTION * h_max),
            "no-spread": flat,
        }

    def _message(self, step: int, kind: str, stats: CollapseStats) -> str:
        what = {
            "dimension": "loss is falling but the teacher puts every sample on the same "
                         "prototype(s) (dimension collapse)",
            "uniform": f"the teacher is (drifting to) the uniform distribution (per-sample "
                       f"entropy above {UNIFORM_DRIFT_FRACTION:.2f} x log(out_dim) for "
                       f"{self.window} logged steps, or above {UNIFORM_FRACTION:.2f} x while the "
                       f"loss falls)",
            "no-spread": f"the teacher gives every sample the same distribution (batch-mean "
                         f"minus per-sample entropy below {MIN_SPREAD_NATS} nats for "
                         f"{self.window} logged steps): it does not tell the samples apart",
        }[kind]
        return (f"step {step}: teacher collapse ({kind}): {what}: per-sample entropy {stats.teacher_entropy:.3f}, batch-mean "
                f"entropy {stats.batch_entropy:.3f}, log(out_dim) {self.max_entropy:.3f}, KL "
                f"{stats.kl:.4f}. This is failure, not progress, whatever the loss does: check "
                f"the views (do two views of one image share more than two images do?), the lr, "
                f"the teacher momentum, the temperatures and center_momentum.")

    def update(self, step: int, loss: float, stats: CollapseStats) -> list[str]:
        """Record one logged step; returns (and logs as WARNING) any new collapse warnings."""
        self.losses.append(loss)
        messages = []
        for kind, present in self._signs(stats, self.loss_falling()).items():
            if present and kind not in self.active:
                self.active.add(kind)
                msg = self._message(step, kind, stats)
                log.warning(msg)
                messages.append(msg)
            elif not present:
                self.active.discard(kind)
        return messages
