"""Sliding-window inference covers whole images exactly; Dice+CE and deep supervision behave."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fed_unimiss.finetune.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    downsample_labels,
    soft_dice_loss,
)
from fed_unimiss.finetune.sliding_window import sliding_window_inference, window_starts


@pytest.mark.parametrize("size,window,overlap", [(10, 4, 0.5), (9, 4, 0.0), (4, 4, 0.5),
                                                 (17, 8, 0.25)])
def test_window_starts_cover_everything(size, window, overlap):
    starts = window_starts(size, window, overlap)
    covered = set()
    for s in starts:
        assert 0 <= s <= size - window
        covered.update(range(s, s + window))
    assert covered == set(range(size))


def _oracle(num_classes: int, labels: torch.Tensor):
    """A predictor that reads the label map back from channel 0 of its input."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0].round().long(), num_classes).movedim(-1, 1).float() * 20
    return predict


@pytest.mark.parametrize("shape,window", [((11, 37, 29), (4, 16, 16)), ((3, 10, 10), (4, 16, 16)),
                                          ((45, 70), (32, 32))])
def test_sliding_window_reassembles_the_label_map(shape, window):
    labels = torch.randint(0, 4, shape)
    image = labels.float()[None, None]
    probs = sliding_window_inference(image, _oracle(4, labels), window, 4, overlap=0.5)
    assert probs.shape == (1, 4, *shape)
    assert torch.equal(probs.argmax(1)[0], labels)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, *shape))


def test_dice_ce_is_low_for_a_perfect_prediction_and_high_for_a_wrong_one():
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = F.one_hot(target, 3).movedim(-1, 1).float() * 30
    wrong = F.one_hot((target + 1) % 3, 3).movedim(-1, 1).float() * 30
    loss = DiceCELoss()
    assert float(loss(perfect, target)) < 1e-3
    assert float(loss(wrong, target)) > 10
    assert float(soft_dice_loss(wrong, target)) > 0.99


def test_deep_supervision_uses_down_sampled_labels_and_normalised_weights():
    assert sum(DeepSupervisionLoss.weights(5)) == pytest.approx(1.0)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :4] = 1
    coarse = downsample_labels(target, (4, 4))
    assert coarse.tolist() == [[[1] * 4, [1] * 4, [0] * 4, [0] * 4]]
    outs = [F.one_hot(t, 2).movedim(-1, 1).float() * 30 for t in (target, coarse)]
    assert float(DeepSupervisionLoss()(outs, target)) < 1e-3
    outs[1] = -outs[1]  # the coarse head is wrong: the loss must see it
    assert float(DeepSupervisionLoss()(outs, target)) > 1.0
