"""Dice from confusion counts, AUC from ranks, accuracy: against hand and brute-force values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fed_unimiss.finetune.metrics import (
    DiceCounter,
    classification_metrics,
    dice_from_counts,
    roc_auc,
)


def test_dice_counter_matches_hand_counts():
    target = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 0, 0])
    c = DiceCounter(3)
    c.update(pred, target)
    # class 1: TP 2, FP 1, FN 1 -> 4/6; class 2: TP 1, FP 0, FN 1 -> 2/3
    np.testing.assert_allclose(c.per_class()[1:], [4 / 6, 2 / 3])
    assert c.mean() == pytest.approx((4 / 6 + 2 / 3) / 2)


def test_dice_counts_accumulate_over_updates():
    a = DiceCounter(2)
    a.update(torch.tensor([1, 0]), torch.tensor([1, 1]))
    a.update(torch.tensor([1, 1]), torch.tensor([0, 1]))
    # pooled: TP 2, FP 1, FN 1
    assert a.per_class()[1] == pytest.approx(4 / 6)


def test_absent_class_is_nan_and_left_out_of_mean():
    d = dice_from_counts(np.array([5, 0, 3]), np.array([0, 0, 1]), np.array([0, 0, 1]))
    assert np.isnan(d[1])
    c = DiceCounter(3)
    c.update(torch.tensor([0, 2, 2]), torch.tensor([0, 2, 0]))
    assert c.mean() == pytest.approx(2 / 3)


def _brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_pairwise_probability_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.random(40) < 0.4
    assert roc_auc(scores, labels) == pytest.approx(_brute_auc(scores, labels))


def test_auc_extremes_and_single_class():
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_classification_metrics_binary_and_multiclass():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
    m = classification_metrics(probs, np.array([0, 1, 0, 1]))
    assert m["accuracy"] == 0.5
    assert m["auc"] == pytest.approx(_brute_auc(probs[:, 1], [0, 1, 0, 1]))
    probs3 = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m3 = classification_metrics(probs3, np.array([0, 1, 2, 1]))
    assert m3 == {"auc": 1.0, "accuracy": 1.0}
