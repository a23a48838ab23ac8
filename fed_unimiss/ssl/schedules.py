"""Per-step schedules and the 2D/3D phase, all pure functions of a GLOBAL step.

DINO's schedules are arrays indexed by the global iteration; here every value is a closed-form
function of the global step (plus the run length), so a federated round can resume the schedule
exactly where the previous round stopped, and a site never needs the history to know where it is.
The cosine itself is :func:`fed_unimiss.optim.cosine_at`, shared with fine-tuning;
:func:`cosine_schedule` returns the same values as an array (for plots and tests).

The UniMiSS reference indexes its schedules by sample count, so they move once per epoch; we move
them every step, which is the intended DINO behaviour (docs/pretraining.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fed_unimiss.optim import cosine_at, cosine_schedule

__all__ = ["Phase", "cosine_at", "cosine_schedule", "phase_at", "phase_steps_before",
           "Schedules"]

Phase = Literal["2d", "3d"]


def phase_at(step: int, steps_per_epoch: int, interval: int, has_2d: bool, has_3d: bool) -> Phase:
    """Which kind of data global step ``step`` trains on.

    Epoch e = step // steps_per_epoch; blocks of ``interval`` epochs alternate X-ray (2D) then CT
    (3D), starting with X-ray. A site with one kind of data trains that kind at every step.
    """
    if not (has_2d or has_3d):
        raise ValueError("the site has neither X-ray nor CT data to train on")
    if not has_3d:
        return "2d"
    if not has_2d:
        return "3d"
    epoch = step // steps_per_epoch
    return "2d" if (epoch // interval) % 2 == 0 else "3d"


def phase_steps_before(step: int, phase: Phase, steps_per_epoch: int, interval: int,
                       has_2d: bool, has_3d: bool) -> int:
    """How many global steps < ``step`` train on ``phase`` (closed form, no loop).

    This is the position of ``step`` in that kind's own stream of batches, so the data sampler can
    resume from a global step without replaying history.
    """
    if phase == "2d" and not has_2d or phase == "3d" and not has_3d:
        return 0
    if not (has_2d and has_3d):
        return step
    block = steps_per_epoch * interval  # steps per modality block
    cycles, rest = divmod(step, 2 * block)
    n_2d = cycles * block + min(rest, block)
    return n_2d if phase == "2d" else step - n_2d


@dataclass(frozen=True)
class Schedules:
    """lr, weight decay, teacher momentum, last-layer freeze and phase at any global step.

    Built from the SSL recipe and the run length; the lr peak depends on the phase because the
    2D and 3D steps have their own batch sizes (peak = lr x batch / 256).
    """

    total_steps: int
    steps_per_epoch: int
    warmup_epochs: int
    lr: float
    min_lr: float
    batch_size_2d: int
    batch_size_3d: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    freeze_last_layer: int
    alternate_interval: int

    @classmethod
    def from_config(cls, ssl, total_steps: int) -> Schedules:
        if ssl.steps_per_epoch is None:
            raise ValueError("ssl.steps_per_epoch is not set; centralized pretraining derives it "
                             "from the data (resolve_steps_per_epoch), a federation must set it")
        return cls(total_steps=total_steps, steps_per_epoch=ssl.steps_per_epoch,
                   warmup_epochs=ssl.warmup_epochs, lr=ssl.lr, min_lr=ssl.min_lr,
                   batch_size_2d=ssl.batch_size_2d, batch_size_3d=ssl.batch_size_3d,
                   weight_decay=ssl.weight_decay, weight_decay_end=ssl.weight_decay_end,
                   momentum_teacher=ssl.momentum_teacher, freeze_last_layer=ssl.freeze_last_layer,
                   alternate_interval=ssl.alternate_interval)

    @property
    def warmup_steps(self) -> int:
        return min(self.warmup_epochs * self.steps_per_epoch, self.total_steps)

    def lr_at(self, step: int, phase: Phase) -> float:
        batch = self.batch_size_2d if phase == "2d" else self.batch_size_3d
        peak = self.lr * batch / 256.0
        return cosine_at(step, peak, self.min_lr, self.total_steps, self.warmup_steps)

    def weight_decay_at(self, step: int) -> float:
        return cosine_at(step, self.weight_decay, self.weight_decay_end, self.total_steps)

    def momentum_at(self, step: int) -> float:
        return cosine_at(step, self.momentum_teacher, 1.0, self.total_steps)

    def last_layer_frozen(self, step: int) -> bool:
        return step < self.freeze_last_layer * self.steps_per_epoch

    def phase(self, step: int, has_2d: bool, has_3d: bool) -> Phase:
        return phase_at(step, self.steps_per_epoch, self.alternate_interval, has_2d, has_3d)

    def position(self, step: int, has_2d: bool = True, has_3d: bool = True) -> dict[str, object]:
        """JSON-able description of where the schedules are (checkpoint sidecars, round logs)."""
        phase = self.phase(step, has_2d, has_3d)
        return {"step": step, "epoch": step // self.steps_per_epoch, "phase": phase,
                "lr": self.lr_at(step, phase), "weight_decay": self.weight_decay_at(step),
                "momentum": self.momentum_at(step), "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "last_layer_frozen": self.last_layer_frozen(step)}
