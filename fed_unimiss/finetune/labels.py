"""Segmentation label maps (NIfTI / PNG), and the :class:`LabelError` every label reader raises.

Classification tables (CSV) are read by :mod:`fed_unimiss.finetune.label_tables`.

Every check here raises :class:`LabelError` naming the file and saying what is
wrong and how to fix it: a label map whose shape differs from its image, values that are not
integers, or classes outside ``[0, num_classes)``. A label map is read through the same NIfTI
reader as its image (:func:`fed_unimiss.data.nifti.read_nifti`, RAS+ then (D, H, W)), so both
arrive on the same voxel grid; resampling to the training spacing then uses nearest neighbour
for the labels (:func:`resample_pair`), so classes are never blended.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from fed_unimiss.data.nifti import read_nifti
from fed_unimiss.data.sample import DataError

__all__ = [
    "LabelError",
    "read_label_map",
    "check_label_map",
    "resample_pair",
    "LABEL_MAP_SUFFIXES",
]

# Suffixes tried, in order, next to an image NAME.nii.gz and in a labels/ folder (see tasks.py).
LABEL_MAP_SUFFIXES = ("_label", "_labels", "_seg", "_mask")


class LabelError(DataError):
    """A label file that cannot be used; the message names the file and the fix."""


def _as_int_labels(array: np.ndarray, path: Path) -> np.ndarray:
    if not np.isfinite(array).all():
        raise LabelError(f"{path}: label map contains NaN or infinite values")
    rounded = np.rint(array)
    if np.abs(array - rounded).max(initial=0.0) > 1e-3:
        raise LabelError(
            f"{path}: label map holds non-integer values (e.g. {float(array.flat[np.argmax(np.abs(array - rounded))]):.3f}); "
            "save class indices as an integer NIfTI/PNG, not an interpolated or scaled image"
        )
    return rounded.astype(np.int64)


def read_label_map(path: str | Path) -> np.ndarray:
    """Read a label map as int64: NIfTI -> (D, H, W) like its image; PNG -> (H, W)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        try:
            array, _, _ = read_nifti(path)
        except DataError as e:
            raise LabelError(f"{path}: {e}") from e
        return _as_int_labels(array, path)
    if name.endswith((".png", ".tif", ".tiff", ".bmp")):
        try:
            with Image.open(path) as im:
                array = np.asarray(im)
        except (OSError, UnidentifiedImageError) as e:
            raise LabelError(f"{path}: not a readable label image ({e})") from e
        if array.ndim == 3:
            raise LabelError(f"{path}: label image has {array.shape[2]} channels; save class "
                             "indices as a single-channel (greyscale) PNG")
        return _as_int_labels(array.astype(np.float64), path)
    raise LabelError(f"{path}: unsupported label file type; use .nii/.nii.gz or .png")


def check_label_map(
    labels: np.ndarray, image_shape: Sequence[int], num_classes: int | None, path: str | Path
) -> None:
    """Shape must equal the image's; values must lie in ``[0, num_classes)``."""
    if tuple(labels.shape) != tuple(image_shape):
        raise LabelError(
            f"{path}: label map shape {tuple(labels.shape)} does not match its image shape "
            f"{tuple(image_shape)}; the label map must be on the image's voxel grid"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise LabelError(f"{path}: negative label {low}; classes must be 0 (background) .. K-1")
    if num_classes is not None and high >= num_classes:
        raise LabelError(
            f"{path}: label {high} is outside the class range 0..{num_classes - 1} "
            f"(num_classes = {num_classes}); raise num_classes or fix the label map"
        )


def resample_pair(
    image: np.ndarray, labels: np.ndarray | None, out_shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an image (linear) and its label map (nearest) to the same ``out_shape``."""
    out_shape = tuple(int(s) for s in out_shape)
    if tuple(image.shape) == out_shape:
        return image, labels
    mode = "trilinear" if image.ndim == 3 else "bilinear"
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    img = F.interpolate(t, size=out_shape, mode=mode, align_corners=False)[0, 0].numpy()
    if labels is None:
        return img, None
    lt = torch.from_numpy(labels.astype(np.float32))[None, None]
    lab = F.interpolate(lt, size=out_shape, mode="nearest")[0, 0].numpy().astype(np.int64)
    return img, lab
