"""Multi-label classification: NIH's table as it comes, splits by patient, per-class AUC and AP.

AUC and AP are checked against computations that share nothing with the code under test: the
pairwise definition of AUC (P(positive scores above negative), ties one half), MONAI's
``compute_roc_auc``, and AP summed threshold by threshold from precision and recall.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ft_layouts import FINDINGS, write_nih, write_nodules
from monai.metrics import compute_roc_auc

from fed_unimiss.finetune import FinetuneConfig, finetune
from fed_unimiss.finetune.cls_model import ClassificationNet
from fed_unimiss.finetune.label_tables import multi_hot, read_class_table
from fed_unimiss.finetune.labels import LabelError
from fed_unimiss.finetune.metrics import average_precision, multilabel_metrics
from fed_unimiss.finetune.splits import held_out_patients
from fed_unimiss.finetune.tasks import cls_input, load_cls_data
from fed_unimiss.finetune.trainer import evaluate_classification
from fed_unimiss.models import MiT, get_config


def _pairwise_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    won = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return won / (len(pos) * len(neg))


def _threshold_ap(scores, labels) -> float:
    """AP = sum over thresholds t (high to low) of (recall(t) - recall(previous t)) * precision(t)."""
    total, last_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        predicted = [s >= t for s in scores]
        tp = sum(p and y for p, y in zip(predicted, labels, strict=True))
        recall, precision = tp / sum(labels), tp / sum(predicted)
        total += (recall - last_recall) * precision
        last_recall = recall
    return total


def _nih_cfg(**kw) -> FinetuneConfig:
    base = dict(task="cls2d", model="micro", multi_label=True, label_table="Data_Entry_2017.csv",
                size_2d=64, class_names=FINDINGS, split="lists")
    return FinetuneConfig(**{**base, **kw})


# ------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_auc_matches_pairwise_definition_and_monai(seed):
    rng = np.random.default_rng(seed)
    n, k = 40, 5
    targets = (rng.random((n, k)) < 0.3).astype(np.float32)
    targets[:2, 3] = [1, 0]  # every class has both kinds of case ...
    targets[:, 4] = 0  # ... except the last, which has no positive
    probs = np.round(rng.random((n, k)) * 0.6 + 0.4 * targets, 1)  # rounded: many ties
    names = [f"c{i}" for i in range(k)]
    m = multilabel_metrics(probs, targets, names)
    expected = [_pairwise_auc(probs[:, i], targets[:, i]) for i in range(k - 1)]
    monai = compute_roc_auc(torch.from_numpy(probs[:, :k - 1]),
                            torch.from_numpy(targets[:, :k - 1]), average="none")
    for i in range(k - 1):
        assert m["auc_per_class"][names[i]] == pytest.approx(expected[i])
        assert m["auc_per_class"][names[i]] == pytest.approx(float(monai[i]))
    assert m["auc_per_class"]["c4"] is None and m["ap_per_class"]["c4"] is None
    assert m["auc"] == pytest.approx(np.mean(expected))  # the undefined class is left out
    assert m["auc_classes"] == k - 1
    assert m["positives_per_class"] == {nm: int(targets[:, i].sum()) for i, nm in enumerate(names)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_threshold_sum(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(30) < 0.4
    scores = np.round(rng.random(30), 1)  # ties
    assert average_precision(scores, labels) == pytest.approx(
        _threshold_ap(scores.tolist(), labels.tolist()))
    assert average_precision(np.arange(4.0), np.array([0, 0, 1, 1])) == pytest.approx(1.0)


# --------------------------------------------------------------------- NIH table as it comes
def test_nih_table_multi_finding_cells_and_no_finding(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,58\n"
        "00000002_000.png,No Finding,0,2,81\n"
        "00000003_000.png,Hernia|Infiltration|Mass,0,3,74\n")
    table = read_class_table(tmp_path / "Data_Entry_2017.csv", multi_label=True)
    assert table.nih and table.has_patients
    names = ("Cardiomegaly", "Effusion", "Hernia", "Infiltration", "Mass")
    hot = [multi_hot(r, names, table.path).tolist() for r in table.rows]
    assert hot == [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]]
    assert [r.patient for r in table.rows] == ["1", "2", "3"]
    with pytest.raises(LabelError, match=r"Data_Entry_2017\.csv:4: finding 'Mass' is not one "):
        multi_hot(table.rows[2], ("Hernia", "Infiltration"), table.path)


@pytest.mark.parametrize("cell,match", [
    ("No Finding|Mass", r":2: 'No Finding' together with findings"),
    ("Mass|Mass", r":2: a finding is listed twice"),
])
def test_nih_table_contradictions_name_the_line(tmp_path, cell, match):
    (tmp_path / "t.csv").write_text(f"Image Index,Finding Labels,Patient ID\na.png,{cell},1\n")
    with pytest.raises(LabelError, match=match):
        read_class_table(tmp_path / "t.csv", multi_label=True)


def test_nih_table_needs_multi_label(tmp_path):
    (tmp_path / "t.csv").write_text("Image Index,Finding Labels,Patient ID\na.png,Mass,1\n")
    with pytest.raises(LabelError, match="multi_label: true"):
        read_class_table(tmp_path / "t.csv", multi_label=False)


# --------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_patient_split_keeps_every_patient_on_one_side(tmp_path, seed):
    root = write_nih(tmp_path / "nih", n_patients=10, per_patient=3, seed=seed)
    cfg = _nih_cfg(split="patients", val_fraction=0.3, seed=seed)
    train = load_cls_data(root, cfg, None, side="train").cases
    val = load_cls_data(root, cfg, None, side="val").cases
    train_p, val_p = {c.patient for c in train}, {c.patient for c in val}
    assert not train_p & val_p
    assert len(train) + len(val) == 30 and len(val_p) == 3  # round(0.3 x 10) patients
    # all images of a held-out patient are held out
    assert all(sum(c.patient == p for c in val) == 3 for p in val_p)
    again = load_cls_data(root, cfg, None, side="val").cases
    assert [c.name for c in again] == [c.name for c in val]  # seeded: the same split again


def test_held_out_patients_does_not_depend_on_row_order():
    patients = [f"p{i}" for i in range(20)]
    a = held_out_patients(patients, 0.25, seed=7)
    b = held_out_patients(list(reversed(patients)) * 2, 0.25, seed=7)
    assert a == b and len(a) == 5
    with pytest.raises(LabelError, match="at least 2 patients"):
        held_out_patients(["p1", "p1"], 0.5, seed=0)


def test_official_lists_are_honoured(tmp_path):
    root = write_nih(tmp_path / "nih", n_patients=6, per_patient=2, test_patients=2)
    cfg = _nih_cfg()
    train = load_cls_data(root, cfg, None, side="train").cases
    val = load_cls_data(root, cfg, None, side="val").cases
    listed = lambda f: set((root / f).read_text().split())  # noqa: E731
    assert {c.name for c in train} == listed("train_val_list.txt")
    assert {c.name for c in val} == listed("test_list.txt")


def test_lists_sharing_a_patient_are_refused(tmp_path):
    root = write_nih(tmp_path / "nih", n_patients=6, per_patient=2, test_patients=2)
    train = (root / "train_val_list.txt").read_text().split()
    test = (root / "test_list.txt").read_text().split()
    # move one image of a test patient into the training list: that patient is now on both sides
    (root / "train_val_list.txt").write_text("\n".join(train + test[:1]) + "\n")
    (root / "test_list.txt").write_text("\n".join(test[1:]) + "\n")
    with pytest.raises(LabelError, match=r"1 patient\(s\) are in both"):
        load_cls_data(root, _nih_cfg(), None, side="train")


def test_separate_folders_sharing_a_patient_are_refused(tmp_path):
    train = write_nodules(tmp_path / "train", n_patients=3, seed=0)
    val = write_nodules(tmp_path / "val", n_patients=3, seed=1)  # same NLST-10x patient ids
    cfg = FinetuneConfig(task="cls3d", model="micro", patch_3d=(8, 48, 48), epochs=1,
                         ct_spacing=None)
    with pytest.raises(LabelError, match=r"3 patient\(s\) are in both"):
        finetune(cfg, None, train, val, tmp_path / "run")


# ------------------------------------------------------------------ evaluation end to end
def test_evaluation_reports_per_finding_auc_of_the_model_outputs(tmp_path):
    """The trainer's report equals the pairwise AUC of the model's own sigmoid outputs."""
    root = write_nih(tmp_path / "nih", n_patients=8, per_patient=3, test_patients=4, seed=5)
    cfg = _nih_cfg(preload=False, batch_size=5)
    data = load_cls_data(root, cfg, None, side="val")
    torch.manual_seed(0)
    model = ClassificationNet(MiT(get_config("micro")), len(FINDINGS)).eval()
    report = evaluate_classification(model, data.cases, cfg, data.class_names)
    with torch.no_grad():
        scores = torch.cat([model(cls_input(c, cfg)[None]).sigmoid() for c in data.cases]).numpy()
    targets = np.stack([c.label for c in data.cases])
    for k, name in enumerate(FINDINGS):
        if 0 < targets[:, k].sum() < len(targets):
            assert report["auc_per_class"][name] == pytest.approx(
                _pairwise_auc(scores[:, k], targets[:, k]), abs=1e-6)
        else:
            assert report["auc_per_class"][name] is None
    assert "accuracy" not in report  # threshold-free
