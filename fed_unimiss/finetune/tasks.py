"""Downstream data: find labelled images in a folder, preprocess them like pretraining, batch them.

Folder layouts (``--train DIR`` / ``--val DIR``):

- Segmentation: each image ``NAME.nii.gz`` (3D CT; also .nii, .mhd) or ``NAME.png`` (2D) has a
  label map ``NAME_label.nii.gz`` (or ``_labels``, ``_seg``, ``_mask``) beside it, or
  ``labels/NAME.nii.gz`` / nnU-Net's ``labelsTr/NAME.nii.gz`` (for ``imagesTr/NAME_0000.nii.gz``)
  under DIR. ``seg2d`` on CT pairs trains on their axial slices (through the 2D path, as
  UniMiSS's volume-slice consistency does); on PNG pairs directly.
  A Decathlon / nnU-Net folder (``dataset.json`` + imagesTr/labelsTr/imagesTs) is read through
  its ``dataset.json`` (:mod:`.decathlon`), which also names the classes.
- Classification: ``DIR/labels.csv`` with ``file,label[,patient]`` rows, files relative to DIR,
  or NIH's ``Data_Entry_2017.csv`` as it comes (``label_table``; :mod:`.label_tables`).

Which rows or cases of DIR are used follows ``cfg.split`` (:mod:`.splits`): the whole folder,
the official split lists, or a seeded split by patient made here.

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
from .decathlon import read_dataset_json
from .label_tables import (
    ClassTable,
    TableRow,
    class_names_of,
    multi_hot,
    read_class_table,
    resolve_files,
)
from .labels import (
    LABEL_MAP_SUFFIXES,
    LabelError,
    check_label_map,
    read_label_map,
)
from .splits import check_patient_disjoint, held_out_patients, read_split_list, split_key

__all__ = [
    "SegCase",
    "ClsCase",
    "ClsData",
    "SegData",
    "find_seg_pairs",
    "load_seg_cases",
    "load_seg_data",
    "load_cls_cases",
    "load_cls_data",
    "cls_input",
    "label_subset",
    "infer_num_classes",
    "SegPatchSampler",
    "to_network_input",
]

log = logging.getLogger(__name__)

VOLUME_EXTS = (".nii.gz", ".nii", ".mhd")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm")
LABEL_EXTS = (".nii.gz", ".nii", ".png")
LABEL_DIRS = ("labels", "labelsTr", "labelsTs", "masks", "label")


@dataclass
class SegCase:
    """One segmentation item: ``image`` float32 and ``labels`` int64 on the same (D,H,W)/(H,W) grid."""

    image: np.ndarray
    labels: np.ndarray
    name: str  # file name, for error messages on this machine only


@dataclass
class ClsCase:
    """One classification item. ``image`` is None when read on demand (``preload: false``)."""

    image: np.ndarray | None  # at the network input size
    label: int | np.ndarray  # a class index, or (K,) float32 multi-hot targets
    name: str
    path: Path | None = None
    patient: str | None = None  # only for the patient-disjointness check, never logged


@dataclass
class ClsData:
    cases: list[ClsCase]
    class_names: tuple[str, ...] | None  # multi-label: the findings, in output order


@dataclass
class SegData:
    cases: list[SegCase]
    label_names: tuple[str, ...] | None  # from dataset.json, index = class value
    case_ids: list[str]  # one per labelled file (the split's unit)


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
    if stem.endswith("_image"):  # MM-WHS: ct_train_1001_image + ct_train_1001_label
        out += [image.parent / f"{stem[:-6]}{s}{e}" for s in LABEL_MAP_SUFFIXES for e in LABEL_EXTS]
    if image.parent.name == "img" and stem.startswith("img"):  # BCV: img/img0001, label/label0001
        out += [image.parent.parent / "label" / f"label{stem[3:]}{e}" for e in LABEL_EXTS]
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
    for path in sorted(p for p in root.rglob("*")
                       if p.is_file() and _ext(p) and not p.name.startswith(".")):
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


def intensity_mode(cfg: FinetuneConfig, modality: str | None) -> str:
    """``cfg.intensity`` with "auto" resolved: CT (or no modality known) -> hu, else zscore."""
    if cfg.intensity != "auto":
        return cfg.intensity
    return "hu" if modality is None or modality.strip().upper() == "CT" else "zscore"


def _ct_to_grid(volume: np.ndarray, spacing, cfg: FinetuneConfig, mode: str = "hu") -> np.ndarray:
    """Volume -> network intensities on the training grid (HU window and scale, or z-score)."""
    if cfg.ct_spacing is not None:
        volume = resample_volume(volume, spacing, tuple(cfg.ct_spacing))
    if mode == "zscore":
        std = float(volume.std())
        return ((volume - float(volume.mean())) / (std if std > 0 else 1.0)).astype(np.float32)
    if cfg.hu_window is not None:
        volume = np.clip(volume, *cfg.hu_window)
    return (volume / cfg.hu_scale).astype(np.float32)


def _labels_to_grid(labels: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resize of a label map onto the resampled image grid."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    t = torch.from_numpy(labels.astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy().astype(np.int64)


def _map_label_values(labels: np.ndarray, cfg: FinetuneConfig, path: Path) -> np.ndarray:
    """Raw label codes -> classes 0..K-1 by ``cfg.label_values`` (identity when it is null)."""
    if cfg.label_values is None:
        return labels
    codes = np.asarray(cfg.label_values)
    order = np.argsort(codes)
    pos = np.clip(np.searchsorted(codes[order], labels), 0, len(codes) - 1)
    found = codes[order][pos] == labels
    if not found.all():
        bad = sorted(set(np.unique(labels[~found]).tolist()))[:5]
        raise LabelError(f"{path}: label value(s) {bad} are not in label_values "
                         f"{list(cfg.label_values)}; add them or fix the label map")
    return order[pos].astype(np.int64)


def _load_pair(image: Path, label: Path, cfg: FinetuneConfig, num_classes: int | None,
               mode: str = "hu"):
    """(image on the training grid, labels on the same grid, spatial rank of the file)."""
    if _ext(image) in VOLUME_EXTS:
        volume, spacing = _read_volume(image)
        labels = _map_label_values(read_label_map(label), cfg, label)
        check_label_map(labels, volume.shape, num_classes, label)
        grid = _ct_to_grid(volume, spacing, cfg, mode)
        return grid, _labels_to_grid(labels, grid.shape), 3
    picture = _read_2d(image)
    labels = _map_label_values(read_label_map(label), cfg, label)
    check_label_map(labels, picture.shape, num_classes, label)
    return picture, labels, 2


def _case_id(image: Path) -> str:
    stem = _stem(image)
    return stem[:-5] if stem.endswith("_0000") else stem


def _split_pairs(pairs: list[tuple[Path, Path]], root: Path, cfg: FinetuneConfig,
                 side: str) -> list[tuple[Path, Path]]:
    """The pairs of this side of ``cfg.split``; a case (one labelled file) is one patient."""
    if cfg.split == "folders":
        return pairs
    if cfg.split == "patients":
        held = held_out_patients([_case_id(p[0]) for p in pairs], cfg.val_fraction, cfg.seed)
        return [p for p in pairs if (_case_id(p[0]) in held) == (side == "val")]
    field = "train_list" if side == "train" else "val_list"
    names = read_split_list(root / getattr(cfg, field), field)
    # A list line may name the image file or the case (nnU-Net: without _0000 and extension).
    return [p for p in pairs if split_key(p[0].name) in names or _case_id(p[0]) in names]


def load_seg_data(
    root: str | Path, cfg: FinetuneConfig, num_classes: int | None, fraction: float = 1.0,
    side: str = "train",
) -> SegData:
    """Labelled cases of a segmentation folder (this ``side`` of the split), preprocessed.

    ``fraction`` < 1 keeps a seeded subset (``cfg.seed``) of the labelled *files*, before seg2d
    cuts volumes into slices, so "10 % of the labels" means 10 % of the annotated scans.
    """
    root = Path(root)
    dataset = read_dataset_json(root)
    if dataset is not None:
        pairs, names, modality = dataset.pairs, dataset.label_names, dataset.modality
        if num_classes is None:
            num_classes = len(names)
        elif num_classes != len(names):
            raise LabelError(f"{root / 'dataset.json'}: {len(names)} labels, but num_classes "
                             f"is {num_classes}; drop num_classes or fix it")
    else:
        pairs, names, modality = find_seg_pairs(root), cfg.class_names, None
    pairs = _split_pairs(pairs, root, cfg, side)
    if not pairs:
        raise LabelError(f"{root}: split {cfg.split!r} leaves no {side} case")
    mode = intensity_mode(cfg, modality)
    cases: list[SegCase] = []
    pairs = label_subset(pairs, fraction, cfg.seed)
    for image, label in pairs:
        array, labels, ndim = _load_pair(image, label, cfg, num_classes, mode)
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
    return SegData(cases, names, [_case_id(p[0]) for p in pairs])


def load_seg_cases(
    root: str | Path, cfg: FinetuneConfig, num_classes: int | None, fraction: float = 1.0
) -> list[SegCase]:
    """The cases of :func:`load_seg_data` (training side)."""
    return load_seg_data(root, cfg, num_classes, fraction).cases


def _find_table(root: Path, cfg: FinetuneConfig) -> Path:
    candidates = [root / cfg.label_table]
    if cfg.label_table == "labels.csv":
        candidates.append(root / "labels" / "labels.csv")
    table = next((t for t in candidates if t.is_file()), None)
    if table is None:
        raise LabelError(f"{candidates[0]}: missing; classification needs a label table "
                         f"(label_table: labels.csv with file,label[,patient], files relative "
                         f"to DIR, or NIH's Data_Entry_2017.csv)")
    return table


def _split_rows(table: ClassTable, root: Path, cfg: FinetuneConfig, side: str) -> list[TableRow]:
    """The rows of this side of ``cfg.split`` (see :mod:`.splits`)."""
    rows = table.rows
    if cfg.split == "folders":
        return rows
    if cfg.split == "patients":
        if not table.has_patients:
            raise LabelError(f"{table.path}: split: patients needs a patient for every row "
                             "(a 'patient' column, or NIH's 'Patient ID')")
        held = held_out_patients([r.patient for r in rows], cfg.val_fraction, cfg.seed)
        return [r for r in rows if (r.patient in held) == (side == "val")]
    lists = {f: read_split_list(root / getattr(cfg, f), f) for f in ("train_list", "val_list")}
    if lists["train_list"] & lists["val_list"]:
        raise LabelError(f"{root}: {len(lists['train_list'] & lists['val_list'])} image(s) are "
                         f"in both {cfg.train_list} and {cfg.val_list}")
    sides = {f: [r for r in rows if split_key(r.file) in names] for f, names in lists.items()}
    check_patient_disjoint([r.patient for r in sides["train_list"]],
                           [r.patient for r in sides["val_list"]],
                           f"{root}: {cfg.train_list} / {cfg.val_list}")
    chosen = sides["train_list" if side == "train" else "val_list"]
    listed = len(lists["train_list" if side == "train" else "val_list"])
    if len(chosen) < listed:
        log.warning("%s: %d of the %d names in the %s list are not in %s", root,
                    listed - len(chosen), listed, side, table.path.name)
    return chosen


def load_cls_data(
    root: str | Path, cfg: FinetuneConfig, num_classes: int | None, fraction: float = 1.0,
    side: str = "train", class_names: tuple[str, ...] | None = None,
) -> ClsData:
    """The labelled cases of a classification folder (this ``side`` of ``cfg.split``).

    Multi-label targets follow ``class_names`` (default: ``cfg.class_names``, else the sorted
    findings of the whole table). ``fraction`` < 1 keeps a seeded subset, stratified by
    class for single-label tasks (at least one per class). Images are resized to the network
    input now (``preload``) or each time they are batched.
    """
    root = Path(root)
    table = read_class_table(_find_table(root, cfg), multi_label=cfg.multi_label,
                             num_classes=None if cfg.multi_label else num_classes,
                             negative_label=cfg.negative_label)
    rows = _split_rows(table, root, cfg, side)
    # A table may list CT and X-rays together (the phantom's does): keep this task's kind.
    wanted = VOLUME_EXTS if cfg.task == "cls3d" else IMAGE_EXTS
    kept = [r for r in rows if _ext(Path(r.file)) in wanted]
    if len(kept) < len(rows):
        log.warning("%s: %d of %d rows are not %s inputs (%s) and are not used", table.path,
                    len(rows) - len(kept), len(rows), cfg.task, "/".join(wanted))
    if not kept:
        raise LabelError(f"{table.path}: no {cfg.task} inputs listed for the {side} side "
                         f"({'/'.join(wanted)}, split {cfg.split!r}); DICOM CT series must be "
                         "converted to NIfTI for fine-tuning")
    rows = kept
    if fraction < 1:
        by_class: dict[object, list] = {}
        for row in rows:
            by_class.setdefault(row.target, []).append(row)
        groups = by_class.values() if not cfg.multi_label else [rows]
        keep = {r.line for group in groups for r in label_subset(group, fraction, cfg.seed)}
        rows = [r for r in rows if r.line in keep]
    names = None
    if cfg.multi_label:
        # Inferred from the whole table, before the split, so both sides agree.
        names = class_names or cfg.class_names or class_names_of(table.rows)
        if not names:
            raise LabelError(f"{table.path}: no finding in any {side} row; set class_names")
    cases = []
    for row, path in zip(rows, resolve_files(table, rows, root), strict=True):
        label = multi_hot(row, names, table.path) if names is not None else int(row.target)
        case = ClsCase(None, label, path.name, path, row.patient)
        if cfg.preload:
            case.image = _cls_image(path, cfg)
        cases.append(case)
    return ClsData(cases, names)


def load_cls_cases(
    root: str | Path, cfg: FinetuneConfig, num_classes: int | None, fraction: float = 1.0
) -> list[ClsCase]:
    """The cases of :func:`load_cls_data` (training side)."""
    return load_cls_data(root, cfg, num_classes, fraction).cases


def _cls_image(path: Path, cfg: FinetuneConfig) -> np.ndarray:
    if cfg.task == "cls3d":
        volume, spacing = _read_volume(path)
        grid = _ct_to_grid(volume, spacing, cfg, intensity_mode(cfg, None))
        return _resize(grid, cfg.patch_3d)
    return _resize(_read_2d(path), (cfg.size_2d, cfg.size_2d))


def cls_input(case: ClsCase, cfg: FinetuneConfig) -> Tensor:
    """The network input of a case: from memory, or read and resized now (``preload: false``)."""
    image = case.image if case.image is not None else _cls_image(case.path, cfg)  # type: ignore[arg-type]
    return to_network_input(image)


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
    """max label + 1 over segmentation or single-label classification cases (at least 2)."""
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
    """Random training patches (image, labels) with foreground oversampling and label-safe flips."""

    def __init__(self, cases: list[SegCase], patch: tuple[int, ...], cfg: FinetuneConfig,
                 rng: np.random.Generator, flip_axes: tuple[int, ...] = ()) -> None:
        self.cases = [self._pad(c, patch) for c in cases]
        self.patch = tuple(patch)
        self.cfg = cfg
        self.rng = rng
        # The axes a patch may be mirrored along (fed_unimiss.finetune.flips: never left-right
        # when labels are lateral), each with probability cfg.flip_prob.
        self.flip_axes = tuple(flip_axes)
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
            for axis in self.flip_axes:
                if self.rng.random() < self.cfg.flip_prob:
                    img, lab = np.flip(img, axis), np.flip(lab, axis)
            images.append(to_network_input(img))
            labels.append(torch.from_numpy(np.ascontiguousarray(lab)))
        return torch.stack(images), torch.stack(labels).long()
