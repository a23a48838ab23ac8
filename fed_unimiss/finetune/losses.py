"""The segmentation loss: MONAI's Dice + cross-entropy, with deep supervision over decoder scales.

The combination follows nnU-Net, which the UniMiSS BCV fine-tuning runs on: cross-entropy gives
well-behaved gradients from the first step, soft Dice counters the class imbalance of small
organs. The Dice term is pooled over the batch (``batch=True``), so a patch without some organ
still gives that organ a defined Dice, and leaves the background out, as the metric does. Deep
supervision adds the same loss on every coarser prediction against a nearest-neighbour
down-sampled label map, with weights halving per scale, normalised to sum to 1 (nnU-Net).

MONAI is the field's implementation of all three pieces; this module only fixes their settings
and the label layout our patch sampler produces ((B, *spatial) integer classes).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["SegmentationLoss", "deep_supervision_weights"]


def deep_supervision_weights(n: int) -> list[float]:
    """1, 1/2, 1/4, ... for ``n`` outputs (fine to coarse), normalised to sum to 1."""
    raw = [0.5**i for i in range(n)]
    return [w / sum(raw) for w in raw]


class SegmentationLoss(nn.Module):
    """``ce_weight`` x CE + ``dice_weight`` x soft foreground Dice, over one or several outputs.

    ``forward(outputs, target)``: ``outputs`` is the logits (B, K, *spatial) or a list of them
    from fine to coarse (deep supervision); ``target`` is (B, *spatial) integer classes.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, levels: int = 1) -> None:
        super().__init__()
        # monai's package import takes ~1.7 s (it loads its data and transform stacks): imported
        # here, so that commands and site processes that never fine-tune do not pay for it.
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        base = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                          lambda_ce=ce_weight, lambda_dice=dice_weight)
        self.loss = DeepSupervisionLoss(base, weights=deep_supervision_weights(levels))

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        target = target.unsqueeze(1).float()  # (B, 1, *spatial): MONAI's label layout
        return self.loss(list(outputs) if isinstance(outputs, (list, tuple)) else outputs, target)
