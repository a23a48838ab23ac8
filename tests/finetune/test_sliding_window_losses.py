"""Whole-image inference reassembles a label map exactly; Dice+CE and deep supervision behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fed_unimiss.finetune import FinetuneConfig
from fed_unimiss.finetune.losses import SegmentationLoss, deep_supervision_weights
from fed_unimiss.finetune.tasks import SegCase
from fed_unimiss.finetune.trainer import evaluate_segmentation


class _Oracle(torch.nn.Module):
    """Reads the label map back from channel 0 of its input: a perfect, shift-equivariant model."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0].round().long(), self.num_classes).movedim(-1, 1).float() * 20


@pytest.mark.parametrize("shape,window", [((11, 37, 29), (4, 16, 16)), ((3, 10, 10), (4, 16, 16)),
                                          ((45, 70), (32, 32))])
def test_whole_image_evaluation_covers_every_voxel(shape, window):
    """Windows over larger images and padding of smaller ones give back every voxel's class."""
    labels = np.random.default_rng(0).integers(0, 4, shape)
    task = "seg3d" if len(shape) == 3 else "seg2d"
    cfg = FinetuneConfig(task=task, patch_3d=window if len(window) == 3 else (16, 96, 96),
                         size_2d=window[0], sw_overlap=0.5)
    image = labels.astype(np.float32)
    metrics = evaluate_segmentation(_Oracle(4), [SegCase(image, labels, "x")], cfg, 4)
    assert metrics["dice_per_class"] == [1.0, 1.0, 1.0, 1.0]


def test_dice_ce_is_low_for_a_perfect_prediction_and_high_for_a_wrong_one():
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = F.one_hot(target, 3).movedim(-1, 1).float() * 30
    wrong = F.one_hot((target + 1) % 3, 3).movedim(-1, 1).float() * 30
    loss = SegmentationLoss()
    assert float(loss(perfect, target)) < 1e-3
    assert float(loss(wrong, target)) > 10
    dice_only = SegmentationLoss(ce_weight=0.0)
    assert float(dice_only(wrong, target)) > 0.99


def test_deep_supervision_uses_down_sampled_labels_and_normalised_weights():
    assert sum(deep_supervision_weights(5)) == pytest.approx(1.0)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :4] = 1
    coarse = torch.zeros(1, 4, 4, dtype=torch.long)
    coarse[:, :2] = 1
    outs = [F.one_hot(t, 2).movedim(-1, 1).float() * 30 for t in (target, coarse)]
    loss = SegmentationLoss(levels=2)
    assert float(loss(outs, target)) < 1e-3
    outs[1] = -outs[1]  # the coarse head is wrong: the loss must see it
    assert float(loss(outs, target)) > 1.0
