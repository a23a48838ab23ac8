"""Segmentation losses: soft Dice + cross-entropy, and deep supervision over decoder scales.

The combination follows nnU-Net, which the UniMiSS BCV fine-tuning runs on: cross-entropy gives
well-behaved gradients from the first step, soft Dice counters the class imbalance of small
organs. Deep supervision adds the same loss on every coarser prediction against a
nearest-neighbour down-sampled label map, with weights halving per scale (normalised to 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["soft_dice_loss", "DiceCELoss", "DeepSupervisionLoss", "downsample_labels"]


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """1 - mean foreground soft Dice, batch-pooled (one Dice per class over the whole batch).

    ``logits`` (B, C, *spatial), ``target`` (B, *spatial) integer classes. Pooling over the batch
    keeps the loss defined for patches where an organ is absent.
    """
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)  # (C,)
    return 1 - dice[1:].mean() if num_classes > 1 else 1 - dice.mean()


class DiceCELoss(nn.Module):
    """``ce_weight`` x cross-entropy + ``dice_weight`` x soft Dice loss."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, target.long())
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(logits, target)


def downsample_labels(target: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of an integer label map (B, *spatial) to ``size``."""
    if tuple(target.shape[1:]) == tuple(size):
        return target
    resized = F.interpolate(target.unsqueeze(1).float(), size=tuple(size), mode="nearest")
    return resized.squeeze(1).long()


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``base`` over outputs from fine to coarse.

    Weights are 1, 1/2, 1/4, ... normalised to sum to 1 (nnU-Net). Each coarser output is compared
    with the label map down-sampled to its own size, so no logits are ever up-sampled for the loss.
    """

    def __init__(self, base: nn.Module | None = None) -> None:
        super().__init__()
        self.base = base if base is not None else DiceCELoss()

    @staticmethod
    def weights(n: int) -> list[float]:
        raw = [0.5**i for i in range(n)]
        total = sum(raw)
        return [w / total for w in raw]

    def forward(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return self.base(outputs, target)
        loss = torch.zeros((), device=target.device)
        for w, out in zip(self.weights(len(outputs)), outputs, strict=False):
            loss = loss + w * self.base(out, downsample_labels(target, out.shape[2:]))
        return loss
