"""Tiny labelled phantoms for the fine-tuning tests, written as real NIfTI / PNG files.

(A uniquely named helper module: ``conftest`` is a name every test folder uses.)

Each CT is a water-density body (0 HU) in air (-1000 HU) with two "organs": a bright ellipsoid
(class 1, +250 HU) and a dark one (class 2, -150 HU) at random positions, plus noise. The label
map is saved as its own NIfTI with the same affine, as a labelling tool would.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

SPACING_ZYX = (3.0, 1.0, 1.0)


def phantom_volume(rng: np.random.Generator, shape=(10, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume (D, H, W) float32, labels (D, H, W) uint8)."""
    d, h, w = shape
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    body = ((y - h / 2) / (0.45 * h)) ** 2 + ((x - w / 2) / (0.45 * w)) ** 2 <= 1
    hu = np.where(body, 0.0, -1000.0)
    labels = np.zeros(shape, np.uint8)
    for cls, value, radius in ((1, 250.0, (3.5, 11, 11)), (2, -150.0, (3, 8, 8))):
        cz = rng.uniform(0.35, 0.65) * d
        cy, cx = rng.uniform(0.3, 0.7, size=2) * (h, w)
        inside = (((z - cz) / radius[0]) ** 2 + ((y - cy) / radius[1]) ** 2
                  + ((x - cx) / radius[2]) ** 2) <= 1
        inside &= body & (labels == 0)
        hu[inside] = value
        labels[inside] = cls
    hu = hu + rng.normal(0, 20, size=shape)
    return hu.astype(np.float32), labels


def save_nifti(array_zyx: np.ndarray, path: Path, dtype=np.float32) -> None:
    """Save a (D, H, W) array as RAS NIfTI with voxel size SPACING_ZYX (stored x, y, z)."""
    affine = np.diag([SPACING_ZYX[2], SPACING_ZYX[1], SPACING_ZYX[0], 1.0])
    nib.save(nib.Nifti1Image(array_zyx.transpose(2, 1, 0).astype(dtype), affine), str(path))


def write_seg_set(root: Path, n: int, seed: int, shape=(10, 64, 64)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        hu, labels = phantom_volume(rng, shape)
        save_nifti(hu, root / f"case{i:02d}.nii.gz")
        save_nifti(labels, root / f"case{i:02d}_label.nii.gz", dtype=np.uint8)
    return root


def write_cls2d_set(root: Path, n: int, seed: int, size: int = 64) -> Path:
    """X-ray-like PNGs; class 1 has a bright disc, class 0 does not."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rows = ["file,label"]
    for i in range(n):
        label = i % 2
        img = rng.normal(90, 15, size=(size, size))
        if label:
            cy, cx = rng.uniform(0.3, 0.7, size=2) * size
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size / 6) ** 2] += 120
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"xr{i:02d}.png")
        rows.append(f"xr{i:02d}.png,{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
