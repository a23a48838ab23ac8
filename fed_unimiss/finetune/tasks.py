"""Downstream data: find labelled images in a folder, preprocess them like pretraining, batch them.

Folder layouts (``--train DIR`` / ``--val DIR``):

- Segmentation: each image ``NAME.nii.gz`` (3D CT; also .nii, .mhd) or ``NAME.png`` (2D) has a
  label map ``NAME_label.nii.gz`` (or ``_labels``, ``_seg``, ``_mask``) beside it, or
  ``labels/NAME.nii.gz`` / nnU-Net's ``labelsTr/NAME.nii.gz`` (for ``imagesTr/NAME_0000.nii.gz``)
  under DIR. ``seg2d`` on CT pairs trains on their axial slices (through the 2D path, as
  UniMiSS's volume-slice consistency does); on PNG pairs directly.
- Classification: ``DIR/labels.csv`` with ``file,label`` rows, files relative to DIR.

Preprocessing matches pretraining (:mod:`fed_unimiss.data`): CT resampled to ``ct_spacing``
(antialiased linear; label maps nearest-neighbour onto the same grid), input = HU / hu_scale;
X-rays in [0, 1], bright = dense, repeated to 3 channels. Everything stays in memory: downstream
sets are small. Only counts are ever logged, never paths beyond the researcher's own console.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fed_unimiss.data.preprocess import resample_volume
from fed_unimiss.data.readers import read_file
from fed_unimiss.data.sample import DataError

from .config import FinetuneConfig
from .labels import (
    LABEL_MAP_SUFFIXES,
    LabelError,
    check_label_map,
    read_label_csv,
    read_label_map,
)

__all__ = [
    "SegCase",
    "ClsCase",
    "find_seg_pairs",
    "load_seg_cases",
    "load_cls_cases",
    "label_subset",
    "infer_num_classes",
    "SegPatchSampler",
    "to_network_input",
]

log = logging.getLogger(__name__)

VOLUME_EXTS = (".nii.gz", ".nii", ".mhd")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm")
LABEL_EXTS = (".nii.gz", ".nii", ".png")
LABEL_DIRS = ("labels", "labelsTr", "labelsTs", "masks")


@dataclass
class SegCase:
    """One segmentation item: ``image`` float32 and ``labels`` int64 on the same (D,H,W)/(H,W) grid."""

    image: np.ndarray
    labels: np.ndarray
    name: str  # file name, for error messages on this machine only


@dataclass
class ClsCase:
    image: np.ndarray  # already at the network input size
    label: int
    name: str


def _ext(path: Path) -> str:
    name = path.name.lower()
    for ext in (*VOLUME_EXTS, *IMAGE_EXTS):
        if name.endswith(ext):
            return ext
    return ""


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(_ext(path))] if _ext(path) else path.stem


def _is_label_file(path: Path, root: Path) -> bool:
    rel_parts = path.relative_to(root).parts[:-1]
    return any(p in LABEL_DIRS for p in rel_parts) or _stem(path).endswith(LABEL_MAP_SUFFIXES)


def _label_candidates(image: Path, root: Path) -> list[Path]:
    stem = _stem(image)
    bare = stem[:-5] if stem.endswith("_0000") else stem  # nnU-Net channel suffix
    out = [image.parent / f"{stem}{s}{e}" for s in LABEL_MAP_SUFFIXES for e in LABEL_EXTS]
    # labels/NAME, labelsTr/NAME (nnU-Net), labels/seg/NAME (`fed-unimiss data phantom`)
    dirs = [*LABEL_DIRS, "labels/seg"]
    for folder in (root, image.parent, image.parent.parent):
        out += [folder / d / f"{n}{e}" for d in dirs for n in (stem, bare) for e in LABEL_EXTS]
    return out


def find_seg_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """(image, label map) pairs under ``root``; images without a label map are skipped (logged)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    pairs, unlabelled = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _ext(p)):
        if _is_label_file(path, root):
            continue
        label = next((c for c in _label_candidates(path, root) if c.is_file()), None)
        if label is None:
            unlabelled += 1
            continue
        pairs.append((path, label))
    if unlabelled:
        log.warning("%s: %d image(s) have no label map and are not used", root, unlabelled)
    if not pairs:
        raise LabelError(
            f"{root}: no image with a label map found; expected NAME.nii.gz next to "
            f"NAME_label.nii.gz (or labels/NAME.nii.gz), or NAME.png next to NAME_label.png"
        )
    return pairs


# ------------------------------------------------------------------------------------ reading
def _read_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    try:
        volume, spacing = read_file(path)
    except DataError as e:
        raise DataError(f"{path}: {e}") from e
    return volume, spacing  # type: ignore[return-value]


def _read_2d(path: Path) -> np.ndarray:
    try:
        return read_file(path, min_xray_side=16)[0]
    except DataError as e:
        raise DataError(f"{path}: {e}") from e


def _ct_to_grid(volume: np.ndarray, spacing, cfg: FinetuneConfig) -> np.ndarray:
    """HU volume -> network intensities on the training grid."""
    if cfg.ct_spacing is not None:
        volume = resample_volume(volume, spacing, tuple(cfg.ct_spacing))
    return (volume / cfg.hu_scale).astype(np.float32)


def _labels_to_grid(labels: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resize of a label map onto the resampled image grid."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    t = torch.from_numpy(labels.astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy().astype(np.int64)


def _load_pair(image: Path, label: Path, cfg: FinetuneConfig, num_classes: int | None):
    """(image on the training grid, labels on the same grid, spatial rank of the file)."""
    if _ext(image) in VOLUME_EXTS:
        volume, spacing = _read_volume(image)
        labels = read_label_map(label)
        check_label_map(labels, volume.shape, num_classes, label)
        grid = _ct_to_grid(volume, spacing, cfg)
        return grid, _labels_to_grid(labels, grid.shape), 3
    picture = _read_2d(image)
    labels = read_label_map(label)
    check_label_map(labels, picture.shape, num_classes, label)
    return picture, labels, 2


def load_seg_cases(
    root: str | Path, cfg: FinetuneConfig, num_classes: int | None, fraction: float = 1.0
) -> list[SegCase]:
    """Labelled cases of a segmentation folder, preprocessed for ``cfg.task``.

    ``fraction`` < 1 keeps a seeded subset (``cfg.seed``) of the labelled *files*, before seg2d
    cuts volumes into slices, so "10 % of the labels" means 10 % of the annotated scans.
    """
    cases: list[SegCase] = []
    for image, label in label_subset(find_seg_pairs(root), fraction, cfg.seed):
        array, labels, ndim = _load_pair(image, label, cfg, num_classes)
        if cfg.task == "seg3d":
            if ndim != 3:
                raise DataError(f"{image}: seg3d needs CT volumes (.nii/.nii.gz/.mhd), got a "
                                "2D image; use --task seg2d")
            cases.append(SegCase(array, labels, image.name))
        elif ndim == 3:  # seg2d on a CT pair: one case per axial slice
            cases += [SegCase(array[z], labels[z], f"{image.name}[{z}]")
                      for z in range(array.shape[0])]
        else:
            cases.append(SegCase(array, labels, image.name))
    return cases


def load_cls_cases(
    root: str | Path, cfg: FinetuneConfig, num_classes: int | None, fraction: float = 1.0
) -> list[ClsCase]:
    """The ``labels.csv`` cases of a classification folder, resized to the network input.

    ``fraction`` < 1 keeps a seeded subset stratified by class (at least one per class).
    """
    root = Path(root)
    table = next((t for t in (root / "labels.csv", root / "labels" / "labels.csv")
                  if t.is_file()), None)
    if table is None:
        raise LabelError(f"{root / 'labels.csv'}: missing; classification needs a file,label "
                         f"table (DIR/labels.csv or DIR/labels/labels.csv, files relative to DIR)")
    rows = list(read_label_csv(table, num_classes, base=root).items())
    # A table may list CT and X-rays together (the phantom's does): keep this task's kind.
    wanted = VOLUME_EXTS if cfg.task == "cls3d" else IMAGE_EXTS
    kept = [r for r in rows if _ext(r[0]) in wanted]
    if len(kept) < len(rows):
        log.warning("%s: %d of %d rows are not %s inputs (%s) and are not used", table,
                    len(rows) - len(kept), len(rows), cfg.task, "/".join(wanted))
    if not kept:
        raise LabelError(f"{table}: no {cfg.task} inputs listed ({'/'.join(wanted)}); DICOM CT "
                         "series must be converted to NIfTI for fine-tuning")
    rows = kept
    if fraction < 1:
        by_class: dict[int, list] = {}
        for row in rows:
            by_class.setdefault(row[1], []).append(row)
        keep = {p for group in by_class.values()
                for p, _ in label_subset(group, fraction, cfg.seed)}
        rows = [r for r in rows if r[0] in keep]
    cases = []
    for path, label in rows:
        if cfg.task == "cls3d":
            volume, spacing = _read_volume(path)
            grid = _ct_to_grid(volume, spacing, cfg)
            image = _resize(grid, cfg.patch_3d)
        else:
            image = _resize(_read_2d(path), (cfg.size_2d, cfg.size_2d))
        cases.append(ClsCase(image, label, path.name))
    return cases


def _resize(array: np.ndarray, size) -> np.ndarray:
    size = tuple(int(s) for s in size)
    if array.shape == size:
        return array
    mode = "trilinear" if array.ndim == 3 else "bilinear"
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode=mode, align_corners=False)[0, 0].numpy()


# ------------------------------------------------------------------------- subsets and classes
def label_subset(cases: list, fraction: float, seed: int) -> list:
    """A seeded subset of ``round(fraction x N)`` cases (at least one), in the original order.

    For seg2d on CT the unit is the slice; pick volumes before slicing when that matters.
    """
    if fraction >= 1:
        return list(cases)
    n = max(1, int(round(fraction * len(cases))))
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(cases), size=n, replace=False).tolist())
    return [cases[i] for i in keep]


def infer_num_classes(cases: list) -> int:
    """max label + 1 over segmentation or classification cases (at least 2)."""
    high = 0
    for c in cases:
        high = max(high, int(c.labels.max()) if isinstance(c, SegCase) else int(c.label))
    return max(2, high + 1)


# ------------------------------------------------------------------------------ batching
def to_network_input(array: np.ndarray) -> Tensor:
    """(D,H,W) -> (1, D, H, W); (H, W) -> (3, H, W): the channel layouts of the MiT paths."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return t.unsqueeze(0) if array.ndim == 3 else t.unsqueeze(0).expand(3, -1, -1).contiguous()


def _class_voxels(labels: np.ndarray) -> list[np.ndarray]:
    """Coordinates (N_c, ndim) of each foreground class present in ``labels``, by class value."""
    return [np.argwhere(labels == c) for c in np.unique(labels) if c > 0]


class SegPatchSampler:
    """Random training patches (image, labels) with foreground oversampling and flips."""

    def __init__(self, cases: list[SegCase], patch: tuple[int, ...], cfg: FinetuneConfig,
                 rng: np.random.Generator) -> None:
        self.cases = [self._pad(c, patch) for c in cases]
        self.patch = tuple(patch)
        self.cfg = cfg
        self.rng = rng
        # Voxel coordinates of every foreground class per case, for centring patches on organs.
        self.fg = [_class_voxels(c.labels) for c in self.cases]

    @staticmethod
    def _pad(case: SegCase, patch) -> SegCase:
        short = [max(p - s, 0) for p, s in zip(patch, case.image.shape, strict=True)]
        if not any(short):
            return case
        width = [(k // 2, k - k // 2) for k in short]
        image = np.pad(case.image, width, mode="constant", constant_values=float(case.image.min()))
        return SegCase(image, np.pad(case.labels, width, mode="constant"), case.name)

    def _origin(self, i: int) -> tuple[int, ...]:
        """A random patch origin; with ``foreground_prob`` centred on a foreground voxel.

        The class is drawn first, uniformly among the classes present in the case, then a voxel
        of it (nnU-Net; MONAI's ``RandCropByLabelClasses``): drawing a voxel of any foreground
        would centre nearly every patch on the largest organ and starve the small ones.
        """
        shape = self.cases[i].image.shape
        fg = self.fg[i]
        if fg and self.rng.random() < self.cfg.foreground_prob:
            voxels = fg[int(self.rng.integers(len(fg)))]
            centre = voxels[self.rng.integers(len(voxels))]
            return tuple(int(np.clip(c - p // 2, 0, s - p))
                         for c, p, s in zip(centre, self.patch, shape, strict=True))
        return tuple(int(self.rng.integers(0, s - p + 1))
                     for p, s in zip(self.patch, shape, strict=True))

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for _ in range(batch_size):
            i = int(self.rng.integers(len(self.cases)))
            sl = tuple(slice(o, o + p) for o, p in zip(self._origin(i), self.patch, strict=True))
            img, lab = self.cases[i].image[sl], self.cases[i].labels[sl]
            for axis in (-1, -2):  # in-plane flips only: the slice axis has a direction
                if self.rng.random() < self.cfg.flip_prob:
                    img, lab = np.flip(img, axis), np.flip(lab, axis)
            images.append(to_network_input(img))
            labels.append(torch.from_numpy(np.ascontiguousarray(lab)))
        return torch.stack(images), torch.stack(labels).long()
