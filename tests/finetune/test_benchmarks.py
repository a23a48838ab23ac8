"""Every paper benchmark's config runs through ``fed-unimiss finetune`` on data in its own layout.

The shipped configs/finetune/<benchmark>.yaml is used as it is; only CPU sizes are overridden on
the command line (micro model, one short epoch, small patches), as docs/reproduce.md's smoke
commands do. The Decathlon folder's label names must reach metrics.json.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ft_layouts import FINDINGS, write_bcv, write_decathlon, write_mmwhs, write_nih, write_nodules
from ft_phantoms import phantom_volume, save_nifti

from fed_unimiss.cli.main import main as cli_main
from fed_unimiss.finetune import FinetuneConfig, finetune
from fed_unimiss.finetune.decathlon import read_dataset_json
from fed_unimiss.finetune.labels import LabelError
from fed_unimiss.finetune.tasks import load_seg_data

CPU_3D = ["--patch-3d", "8", "48", "48"]


def _run(config: str, data, out, *extra: str) -> dict:
    code = cli_main(["finetune", "--config", f"configs/finetune/{config}.yaml", "--init",
                     "scratch", "--model", "micro", "--train", str(data), "--val", str(data),
                     "--out", str(out), "--epochs", "1", "--steps-per-epoch", "1",
                     "--batch-size", "2", "--threads", "1", *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_chestxray14_runs_on_the_nih_download_layout(tmp_path, capsys):
    root = write_nih(tmp_path / "ChestX-ray14", n_patients=8, per_patient=3, test_patients=4)
    m = _run("chestx-ray14", root, tmp_path / "run", "--size-2d", "64")
    assert m["class_names"][:len(FINDINGS)] == list(FINDINGS) and len(m["class_names"]) == 14
    assert m["data"]["train_items"] == 12 and m["data"]["val_items"] == 12  # the two lists
    assert set(m["auc_per_class"]) == set(m["class_names"])
    assert m["auc_per_class"]["Hernia"] is None  # no positive in the data: left out of the mean
    defined = [v for v in m["auc_per_class"].values() if v is not None]
    assert defined and m["auc"] == pytest.approx(np.mean(defined))
    assert "accuracy" not in m and m["config"]["multi_label"] is True
    printed = capsys.readouterr().out
    assert "AUC Cardiomegaly" in printed and "cls2d: final auc" in printed


def test_nlst_nodule_runs_on_crops_with_patients(tmp_path):
    root = write_nodules(tmp_path / "nlst", n_patients=6, per_patient=2)
    m = _run("nlst-nodule", root, tmp_path / "run", "--patch-3d", "8", "48", "48")
    assert m["data"]["train_items"] + m["data"]["val_items"] == 12
    assert m["data"]["val_items"] == 2  # round(0.2 x 6) = 1 patient, two nodules
    assert 0.0 <= m["auc"] <= 1.0


def test_cls3d_multi_label(tmp_path):
    """cls3d takes multi-label tables too: findings per CT volume, sigmoid + BCE, AUC per finding."""
    root = write_nodules(tmp_path / "ct", n_patients=4, per_patient=2)
    files = [line.split(",")[0] for line in (root / "labels.csv").read_text().split()[1:]]
    cells = ["emphysema|nodule", "nodule", "none", "emphysema"]
    (root / "labels.csv").write_text("file,label,patient\n" + "".join(
        f"{f},{cells[i % 4]},P{i // 2}\n" for i, f in enumerate(files)))
    cfg = FinetuneConfig(task="cls3d", model="micro", multi_label=True, negative_label="none",
                         split="patients", val_fraction=0.5, patch_3d=(8, 48, 48),
                         ct_spacing=None, epochs=1, batch_size=2, threads=1)
    m = finetune(cfg, None, root, root, tmp_path / "run")
    assert m["class_names"] == ["emphysema", "nodule"]
    assert set(m["auc_per_class"]) == {"emphysema", "nodule"}
    assert m["data"]["train_items"] == 4 and m["data"]["val_items"] == 4


@pytest.mark.parametrize("config", ["msd-spleen", "msd"])
def test_msd_task_folder_runs_and_names_the_labels(tmp_path, config):
    root = write_decathlon(tmp_path / "Task09_Spleen", n=5)
    m = _run(config, root, tmp_path / "run", *CPU_3D)
    assert m["label_names"] == ["background", "bright", "dark"]
    assert set(m["dice_per_label"]) == {"bright", "dark"}
    assert m["num_classes"] == 3
    assert m["data"]["train_items"] == 4 and m["data"]["val_items"] == 1  # 20 % of 5 cases


def test_msd_mr_task_is_z_scored_and_nnunet_v2_layout_is_read(tmp_path):
    root = write_decathlon(tmp_path / "Dataset004_Hippocampus", n=4, modality="MRI",
                           nnunet_v2=True)
    ds = read_dataset_json(root)
    assert ds is not None and ds.modality == "MRI" and len(ds.pairs) == 4
    assert all(not p[0].name.startswith(".") for p in ds.pairs)
    cfg = FinetuneConfig(task="seg3d", ct_spacing=None)  # intensity: auto
    data = load_seg_data(root, cfg, None)
    assert data.label_names == ("background", "bright", "dark")
    for case in data.cases:
        assert abs(float(case.image.mean())) < 1e-4 and float(case.image.std()) == pytest.approx(1, abs=1e-3)
    m = _run("msd", root, tmp_path / "run", *CPU_3D)
    assert m["label_names"] == ["background", "bright", "dark"]


def test_multi_channel_decathlon_task_is_refused(tmp_path):
    root = write_decathlon(tmp_path / "Task01_BrainTumour", n=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(LabelError, match="modality: 4 channels"):
        read_dataset_json(root)


def test_bcv_runs_on_the_synapse_download_layout(tmp_path):
    training = write_bcv(tmp_path / "Abdomen", n=5)
    m = _run("bcv", training, tmp_path / "run", *CPU_3D)
    assert m["num_classes"] == 14 and m["label_names"][1] == "spleen"
    assert set(m["dice_per_label"]) == set(m["label_names"][1:])
    assert m["data"]["train_items"] == 3 and m["data"]["val_items"] == 2  # 40 % of 5 cases


def test_mmwhs_runs_on_its_label_codes(tmp_path):
    folder = write_mmwhs(tmp_path / "MM-WHS", n=5)
    m = _run("mm-whs", folder, tmp_path / "run", *CPU_3D)
    assert m["num_classes"] == 8 and len(m["dice_per_label"]) == 7
    cfg = FinetuneConfig(task="seg3d", ct_spacing=None, num_classes=8,
                         label_values=(0, 205, 420, 500, 550, 600, 820, 850))
    cases = load_seg_data(folder, cfg, 8).cases
    assert sorted(np.unique(np.concatenate([c.labels.ravel() for c in cases]))) == [0, 1, 3]
    # a code outside label_values names the file
    rng = np.random.default_rng(0)
    _, labels = phantom_volume(rng, (10, 64, 64))
    save_nifti(np.where(labels > 0, 421, 0).astype(np.int16),
               folder / "ct_train_1001_label.nii.gz", dtype=np.int16)
    with pytest.raises(LabelError, match=r"ct_train_1001_label\.nii\.gz: label value\(s\) \[421\]"):
        load_seg_data(folder, cfg, 8)


def test_segmentation_split_lists_and_patients(tmp_path):
    """Official lists name cases (file or case id); the patient split holds out whole cases."""
    root = write_decathlon(tmp_path / "Task09_Spleen", n=5)
    (root / "train.txt").write_text("organ_0.nii.gz\norgan_1\norgan_2\n")
    (root / "val.txt").write_text("organ_3\norgan_4.nii.gz\n")
    cfg = FinetuneConfig(task="seg3d", ct_spacing=None, split="lists", train_list="train.txt",
                         val_list="val.txt")
    assert load_seg_data(root, cfg, None, side="train").case_ids == ["organ_0", "organ_1",
                                                                     "organ_2"]
    assert load_seg_data(root, cfg, None, side="val").case_ids == ["organ_3", "organ_4"]
    for seed in range(4):
        cfg = FinetuneConfig(task="seg3d", ct_spacing=None, split="patients", val_fraction=0.4,
                             seed=seed)
        train = load_seg_data(root, cfg, None, side="train").case_ids
        val = load_seg_data(root, cfg, None, side="val").case_ids
        assert not set(train) & set(val) and len(val) == 2 and len(train) == 3


def test_patient_split_needs_one_folder(tmp_path, caplog):
    a = write_decathlon(tmp_path / "a", n=3)
    b = write_decathlon(tmp_path / "b", n=3, seed=1)
    code = cli_main(["finetune", "--config", "configs/finetune/msd-spleen.yaml", "--init",
                     "scratch", "--model", "micro", "--train", str(a), "--val", str(b),
                     "--out", str(tmp_path / "run"), *CPU_3D])
    assert code == 2 and "split: 'patients' splits one folder by patient" in caplog.text
