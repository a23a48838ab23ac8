"""The probe's pieces against hand computations: the k-NN vote, balanced accuracy, intervals,
and the whole probe on encoders whose answer is known (one that carries the labels, one that
carries nothing)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fed_unimiss.finetune.config import FinetuneConfig
from fed_unimiss.finetune.tasks import ClsCase, SegCase
from fed_unimiss.models.mit import MiTFeatures
from fed_unimiss.probe import ProbeConfig, ProbeData, probe_encoder
from fed_unimiss.probe.classifiers import knn_predict, linear_probe_predict
from fed_unimiss.probe.stats import balanced_accuracy, class_recalls, mean_interval, t_quantile

# A toy set on the unit circle (scaled by 3: the vote must use cosine, not dot products).
# Query (1, 0): t0 is the same direction (class 1, cosine 1), t1 and t2 lie at cosine 0.6
# (class 0), t3 is opposite (class 1, cosine -1).
TRAIN = 3 * torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
TRAIN_Y = torch.tensor([1, 0, 0, 1])
QUERY = torch.tensor([[1.0, 0.0], [0.0, -2.0]])


def test_knn_weighted_vote_matches_the_hand_computation():
    # Query 0, k = 3: neighbours t0 (cos 1, class 1), t1 and t2 (cos 0.6, class 0).
    #   T = 0.07: class 1 gets exp(1 / 0.07) = 1.6e6, class 0 gets 2 exp(0.6 / 0.07) = 1.06e4 -> 1
    #   T = 1:    class 1 gets exp(1) = 2.72,         class 0 gets 2 exp(0.6) = 3.64        -> 0
    # Query 1 = (0, -1): cosines 0, -0.8, 0.8, 0 -> neighbours t2 (0.8, class 0) and then
    # t0, t3 (cos 0, class 1): T = 0.07: exp(0.8/0.07) = 9.3e4 against 2 -> 0;
    # T = 100: exp(0.008) = 1.008 against 2 exp(0) = 2 -> 1 (nearly a plain majority).
    assert math.exp(1 / 0.07) > 2 * math.exp(0.6 / 0.07) and 2 * math.exp(0.6) > math.exp(1)
    assert knn_predict(TRAIN, TRAIN_Y, QUERY, 2, k=3, temperature=0.07).tolist() == [1, 0]
    assert knn_predict(TRAIN, TRAIN_Y, QUERY, 2, k=3, temperature=1.0).tolist() == [0, 0]
    assert knn_predict(TRAIN, TRAIN_Y, QUERY, 2, k=3, temperature=100.0).tolist() == [0, 1]
    # k = 1 is the nearest neighbour; k beyond the training set uses all of it.
    assert knn_predict(TRAIN, TRAIN_Y, QUERY, 2, k=1).tolist() == [1, 0]
    # All four at T = 1, query 0: class 1 exp(1) + exp(-1) = 3.09 < class 0 3.64 -> 0.
    assert knn_predict(TRAIN, TRAIN_Y, QUERY[:1], 2, k=50, temperature=1.0).tolist() == [0]


def test_linear_probe_separates_a_linear_toy_set():
    x = torch.tensor([[0.0, 1.0], [0.2, 2.0], [3.0, 0.5], [3.5, 1.5], [1.0, 8.0], [1.2, 9.0]])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert linear_probe_predict(x, y, x, 3).tolist() == y.tolist()


def test_balanced_accuracy_by_hand():
    truth = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2])
    # recalls: class 0 3/4, class 1 1/2, class 2 1/1; class 3 absent -> not averaged.
    assert class_recalls(pred, truth, 4) == [0.75, 0.5, 1.0, None]
    assert balanced_accuracy(pred, truth, 4) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    # Predicting the majority class everywhere is chance, however large that class.
    assert balanced_accuracy(np.zeros(7, int), truth, 4) == pytest.approx(1 / 3)


def test_t_interval_matches_tables():
    # Two-sided 95 % Student-t quantiles from any table.
    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    ci = mean_interval([0.5, 0.6, 0.7])  # sd 0.1: half-width 4.303 x 0.1 / sqrt(3) = 0.2484
    assert ci["mean"] == pytest.approx(0.6)
    assert (ci["low"], ci["high"]) == pytest.approx((0.6 - 0.24843, 0.6 + 0.24843), abs=1e-4)
    assert mean_interval([0.4, None]) == {"mean": 0.4, "low": None, "high": None, "n": 1}


# ------------------------------------------------------------------ encoders with known answers
class LabelEncoder(nn.Module):
    """One stage whose map is the one-hot of round(input): the image *is* the label map here,
    so its features carry the labels exactly. ``constant`` gives the same feature everywhere."""

    def __init__(self, num_classes: int, constant: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(embed_dims=(num_classes,))
        self.scale = nn.Parameter(torch.ones(()))
        self.num_classes, self.constant = num_classes, constant

    def forward_intermediates(self, x, decoder=False):
        labels = x[:, 0].round().long().clamp(0, self.num_classes - 1)
        fmap = F.one_hot(labels, self.num_classes).movedim(-1, 1).float() * self.scale
        if self.constant:
            fmap = torch.ones_like(fmap)
        return MiTFeatures(fmap, [fmap], [fmap.flatten(2).mean(2)], [], None)


def _seg_cases(n: int, rng: np.random.Generator, shape=(10, 21, 19)) -> list[SegCase]:
    """Volumes whose labels are random boxes of classes 1..3, image = labels (not window-sized,
    so windows are cut and padded)."""
    cases = []
    for i in range(n):
        labels = np.zeros(shape, np.int64)
        for c in (1, 2, 3):
            z, y, x = (rng.integers(0, s - 4) for s in shape)
            labels[z:z + 4, y:y + 6, x:x + 6] = c
        cases.append(SegCase(labels.astype(np.float32), labels, f"v{i}"))
    return cases


@pytest.mark.parametrize("constant, expected", [(False, 1.0), (True, 0.25)])
def test_dense_probe_scores_one_for_label_features_and_chance_for_constant(constant, expected):
    rng = np.random.default_rng(0)
    data = ProbeData(_seg_cases(3, rng), _seg_cases(2, rng), 4, None, dense=True)
    cfg = ProbeConfig(data=FinetuneConfig(task="seg3d", patch_3d=(4, 8, 8)), voxels_per_class=30,
                      seeds=(0, 1), k=5)
    row = probe_encoder(LabelEncoder(4, constant), data, cfg)
    for kind in ("knn", "linear"):
        score = row["stages"]["stage1"][kind]
        assert score["balanced_accuracy"]["mean"] == pytest.approx(expected), kind
        assert len(score["per_seed"]) == 2 and set(score["per_class"]) == {"0", "1", "2", "3"}


@pytest.mark.parametrize("constant, expected", [(False, 1.0), (True, 1 / 3)])
def test_global_probe_scores_one_for_label_features_and_chance_for_constant(constant, expected):
    def cases(n):
        return [ClsCase(np.full((32, 32), float(i % 3), np.float32), i % 3, f"x{i}")
                for i in range(n)]

    data = ProbeData(cases(12), cases(9), 3, None, dense=False)
    cfg = ProbeConfig(data=FinetuneConfig(task="cls2d", size_2d=32), seeds=(0,), k=3)
    row = probe_encoder(LabelEncoder(3, constant), data, cfg)
    for kind in ("knn", "linear"):
        assert row["stages"]["stage1"][kind]["balanced_accuracy"]["mean"] == pytest.approx(
            expected), kind


@pytest.mark.parametrize("window, grid", [((8, 48, 48), (4, 12, 12)), ((8, 48, 48), (1, 3, 3)),
                                          ((7, 20, 20), (4, 10, 10)), ((64, 64), (8, 8))])
def test_features_at_voxels_equal_the_upsampled_map(window, grid):
    """Reading a stage map at sampled voxels gives what upsampling the whole window does."""
    from fed_unimiss.probe.features import _at_voxels

    fmap = torch.randn(5, *grid, generator=torch.Generator().manual_seed(0))
    mode = "trilinear" if len(window) == 3 else "bilinear"
    full = F.interpolate(fmap[None], size=window, mode=mode, align_corners=False)[0]
    local = np.stack([np.random.default_rng(a).integers(0, w, 50) for a, w in enumerate(window)],
                     axis=1)
    expected = full[(slice(None), *(torch.from_numpy(local[:, a]) for a in range(len(window))))]
    assert torch.allclose(_at_voxels(fmap, local, window), expected.T, atol=1e-5)
