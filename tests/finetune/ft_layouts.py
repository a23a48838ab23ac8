"""Tiny data sets in each paper benchmark's own folder layout, written as real files.

(A uniquely named helper module, like ft_phantoms.py; benchmarks/bench_reproduce.py uses it too.)

- :func:`write_nih`: NIH ChestX-ray14 as downloaded: ``images_001/images/PPPPPPPP_NNN.png``,
  ``Data_Entry_2017.csv`` with NIH's header (multi-finding cells joined by ``|``, ``No Finding``),
  ``train_val_list.txt`` / ``test_list.txt`` split by patient.
- :func:`write_decathlon`: an MSD task folder (``dataset.json`` + imagesTr/labelsTr/imagesTs, the
  ``._`` AppleDouble files of the MSD archives included), or its nnU-Net v2 form.
- :func:`write_mmwhs`: MM-WHS ``ct_train/ct_train_10NN_image.nii.gz`` + ``..._label.nii.gz``
  with MM-WHS's label codes (205, 420, ...).
- :func:`write_bcv`: BCV as downloaded: ``RawData/Training/img/img00NN.nii.gz`` +
  ``label/label00NN.nii.gz``.
- :func:`write_nodules`: NIfTI nodule crops + ``labels.csv`` (file,label,patient).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ft_phantoms import phantom_volume, save_nifti
from PIL import Image

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule")
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
MMWHS_CODES = (0, 205, 420, 500, 550, 600, 820, 850)


def write_nih(root: Path, n_patients: int = 8, per_patient: int = 3, seed: int = 0,
              size: int = 64, test_patients: int = 3) -> Path:
    """Returns ``root``. Cardiomegaly images get a bright blob, so the finding is learnable."""
    rng = np.random.default_rng(seed)
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows, train, test = [NIH_HEADER], [], []
    yy, xx = np.mgrid[:size, :size]
    for p in range(1, n_patients + 1):
        for k in range(per_patient):
            name = f"{p:08d}_{k:03d}.png"
            findings = [f for f in FINDINGS if rng.random() < 0.35]
            img = rng.normal(90, 15, size=(size, size))
            if "Cardiomegaly" in findings:
                img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 5) ** 2] += 100
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name)
            cell = "|".join(findings) if findings else "No Finding"
            rows.append(f"{name},{cell},{k},{p},{40 + p},M,PA,2500,2048,0.143,0.143")
            (test if p > n_patients - test_patients else train).append(name)
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def write_decathlon(root: Path, n: int = 5, seed: int = 0, modality: str = "CT",
                    nnunet_v2: bool = False, n_test: int = 1, shape=(10, 64, 64)) -> Path:
    """An MSD task (``TaskNN_Name`` layout) or, with ``nnunet_v2``, a ``DatasetNNN`` folder."""
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    training, tests = [], []
    for i in range(n + n_test):
        hu, labels = phantom_volume(rng, shape)
        if modality != "CT":  # MR-like: arbitrary positive units
            hu = (hu + 1000.0) * 0.7
        case = f"organ_{i}"
        image = f"{case}_0000.nii.gz" if nnunet_v2 else f"{case}.nii.gz"
        if i >= n:
            save_nifti(hu, root / "imagesTs" / image)
            tests.append(f"./imagesTs/{image}")
            continue
        save_nifti(hu, root / "imagesTr" / image)
        save_nifti(labels, root / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    junk = "._organ_0_0000.nii.gz" if nnunet_v2 else "._organ_0.nii.gz"
    (root / "imagesTr" / junk).write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    if nnunet_v2:
        meta = {"channel_names": {"0": modality}, "labels": {"background": 0, "bright": 1,
                                                             "dark": 2},
                "numTraining": n, "file_ending": ".nii.gz"}
    else:
        meta = {"name": "Organ", "modality": {"0": modality},
                "labels": {"0": "background", "1": "bright", "2": "dark"},
                "numTraining": n, "numTest": n_test, "training": training, "test": tests}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def write_mmwhs(root: Path, n: int = 5, seed: int = 0, shape=(10, 64, 64)) -> Path:
    """``root/ct_train``: the two phantom organs carry MM-WHS codes 500 (LV) and 205 (myo)."""
    rng = np.random.default_rng(seed)
    folder = root / "ct_train"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hu, labels = phantom_volume(rng, shape)
        codes = np.choose(labels, [0, 500, 205]).astype(np.int16)
        save_nifti(hu, folder / f"ct_train_{1001 + i}_image.nii.gz")
        save_nifti(codes, folder / f"ct_train_{1001 + i}_label.nii.gz", dtype=np.int16)
    return folder


def write_bcv(root: Path, n: int = 5, seed: int = 0, shape=(10, 64, 64)) -> Path:
    """``root/RawData/Training`` with ``img/`` and ``label/`` as in the Synapse download."""
    rng = np.random.default_rng(seed)
    training = root / "RawData" / "Training"
    (training / "img").mkdir(parents=True, exist_ok=True)
    (training / "label").mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        hu, labels = phantom_volume(rng, shape)
        labels = np.choose(labels, [0, 1, 6]).astype(np.uint8)  # spleen, liver
        save_nifti(hu, training / "img" / f"img{i:04d}.nii.gz")
        save_nifti(labels, training / "label" / f"label{i:04d}.nii.gz", dtype=np.uint8)
    return training


def write_nodules(root: Path, n_patients: int = 6, per_patient: int = 2, seed: int = 0,
                  shape=(10, 40, 40)) -> Path:
    """Nodule crops: malignant ones are larger and denser. labels.csv: file,label,patient."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    z, y, x = np.meshgrid(*(np.arange(s) - s / 2 for s in shape), indexing="ij")
    rows = ["file,label,patient"]
    for p in range(n_patients):
        for k in range(per_patient):
            label = (p + k) % 2
            radius = 9.0 if label else 4.0
            hu = np.full(shape, -850.0) + rng.normal(0, 30, size=shape)
            hu[(3 * z) ** 2 + y**2 + x**2 <= radius**2] = 40.0
            name = f"nodule_{p:02d}_{k}.nii.gz"
            save_nifti(hu.astype(np.float32), root / name)
            rows.append(f"{name},{label},NLST-{100 + p}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
