"""Downstream metrics: Dice per class from confusion counts, ROC AUC from ranks, accuracy.

Written in numpy/torch on purpose (no scikit-learn dependency). Dice is accumulated as counts
(true positives, false positives, false negatives per class) so that whole volumes, slices and
batches can be added up before dividing; AUC is the Mann-Whitney U statistic with average ranks
for ties, which equals the area under the ROC curve exactly. Multi-label tasks (ChestX-ray14)
are reported threshold-free: per-class AUC and average precision, and their means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["DiceCounter", "dice_from_counts", "roc_auc", "average_precision", "accuracy",
           "classification_metrics", "multilabel_metrics"]


def dice_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Dice = 2TP / (2TP + FP + FN) per class; NaN where the class is absent from both."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)


@dataclass
class DiceCounter:
    """Accumulates per-class confusion counts over many predictions (label maps of ints).

    Background (class 0) is counted but left out of ``mean``, as is usual for organ Dice.
    """

    num_classes: int
    tp: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + 1), got {self.num_classes}")
        self.tp = np.zeros(self.num_classes, np.int64)
        self.fp = np.zeros(self.num_classes, np.int64)
        self.fn = np.zeros(self.num_classes, np.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one prediction/target pair of integer label maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}")
        k = self.num_classes
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        # One bincount over (target, pred) pairs gives the whole confusion matrix.
        cm = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k).cpu().numpy()
        tp = np.diag(cm)
        self.tp += tp
        self.fp += cm.sum(axis=0) - tp
        self.fn += cm.sum(axis=1) - tp

    def per_class(self) -> np.ndarray:
        return dice_from_counts(self.tp, self.fp, self.fn)

    def mean(self) -> float:
        """Mean Dice over the foreground classes present in prediction or target."""
        fg = self.per_class()[1:]
        fg = fg[~np.isnan(fg)]
        return float(fg.mean()) if fg.size else float("nan")


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Binary ROC AUC = P(score of a positive > score of a negative), ties counting one half.

    Computed as the Mann-Whitney U of the positives' average ranks. NaN if only one class occurs.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average rank (1-based) over each run of tied scores.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, n in zip(first, counts, strict=False):
        ranks[order[start:start + n]] = start + (n + 1) / 2.0
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum: sum_k (R_k - R_(k-1)) P_k.

    Thresholds are the distinct scores from high to low (tied scores enter together), the
    definition of scikit-learn's ``average_precision_score``. NaN without positives.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each run of ties
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    pred, labels = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    return float((pred == labels).mean()) if labels.size else float("nan")


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``auc`` (binary, or one-vs-rest macro mean over classes present) and ``accuracy``.

    ``probs`` is (N, C) class probabilities, ``labels`` (N,) integer classes.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N, C) with N = {labels.shape[0]}, got {probs.shape}")
    if probs.shape[1] == 2:
        auc = roc_auc(probs[:, 1], labels == 1)
    else:
        aucs = [roc_auc(probs[:, c], labels == c) for c in range(probs.shape[1])]
        aucs = [a for a in aucs if not np.isnan(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    return {"auc": auc, "accuracy": accuracy(probs.argmax(axis=1), labels)}


def multilabel_metrics(
    probs: np.ndarray, targets: np.ndarray, names: list[str] | tuple[str, ...]
) -> dict[str, object]:
    """Threshold-free report of a multi-label classifier (one sigmoid per class).

    ``probs`` and ``targets`` are (N, K). Returns ``auc`` (mean over the classes that have both
    positives and negatives: the ChestX-ray14 number), ``auc_per_class``, ``ap`` and
    ``ap_per_class`` (average precision), and ``positives_per_class``; classes without both
    kinds of case get None and are left out of the means.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    if probs.shape != targets.shape or probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} must both be "
                         f"(N, {len(names)})")
    aucs = [roc_auc(probs[:, k], targets[:, k]) for k in range(len(names))]
    aps = [average_precision(probs[:, k], targets[:, k]) for k in range(len(names))]

    def mean(values: list[float]) -> float:
        defined = [v for v in values if not np.isnan(v)]
        return float(np.mean(defined)) if defined else float("nan")

    def named(values: list[float]) -> dict[str, float | None]:
        return {n: None if np.isnan(v) else float(v) for n, v in zip(names, values, strict=True)}

    return {"auc": mean(aucs), "auc_per_class": named(aucs), "ap": mean(aps),
            "ap_per_class": named(aps),
            "positives_per_class": {n: int(targets[:, k].sum()) for k, n in enumerate(names)},
            "auc_classes": int(sum(not np.isnan(a) for a in aucs))}
