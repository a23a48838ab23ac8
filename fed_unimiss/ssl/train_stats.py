"""``TrainStats``: what one ``train_steps`` call of the engine did, for the site log and the
gradient step's public metrics (a module of its own so that both read it without importing the
engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainStats"]


@dataclass
class TrainStats:
    """Summary of one :meth:`~fed_unimiss.ssl.engine.SelfDistillation.train_steps` call."""

    steps: int = 0              # optimizer steps taken (steps with an empty batch are not)
    samples_2d: int = 0         # X-ray images + CT slices through the 2D path (per sample)
    samples_3d: int = 0         # CT sub-volumes through the 3D path
    loss: float = float("nan")  # mean loss over the steps taken
    # Mean loss over the X-ray (2D) steps and the CT (3D) steps apart: the two losses differ in
    # scale, so a round mixing them can hide the trend of either (the demo prints both).
    loss_2d: float = float("nan")
    loss_3d: float = float("nan")
    seconds: float = 0.0
    samples_per_s: float = 0.0  # (X-ray images + CT sub-volumes) / seconds, all processes
    skipped: int = 0            # corrupt or unreadable items
    empty_batches: int = 0      # steps skipped because every item of the batch was bad
    teacher_entropy: float = float("nan")
    batch_entropy: float = float("nan")
    kl: float = float("nan")
    history: list[dict[str, Any]] = field(default_factory=list)  # one metric dict per step
