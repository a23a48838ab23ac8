"""Medical Segmentation Decathlon and nnU-Net folders: ``dataset.json`` + imagesTr/labelsTr/imagesTs.

Both layouts are read as they are downloaded or prepared:

- MSD (``TaskNN_Name``, also nnU-Net v1 raw data): ``dataset.json`` lists ``training`` pairs
  (``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``) and ``test`` images,
  ``labels`` as ``{"0": "background", "1": "spleen"}`` and ``modality`` as ``{"0": "CT"}``.
- nnU-Net v2 (``DatasetNNN_Name``): no pair list; ``imagesTr/CASE_0000.nii.gz`` goes with
  ``labelsTr/CASE.nii.gz``; ``labels`` as ``{"background": 0, "spleen": 1}``, ``channel_names``
  instead of ``modality`` and ``file_ending``.

The label names end up in metrics.json next to each class's Dice. Hidden files (the ``._x.nii.gz``
AppleDouble files inside the MSD archives) are never taken for images. Multi-channel tasks (MSD
BrainTumour: 4 MR sequences, Prostate: T2 + ADC) are refused: the MiT's 3D path has one channel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .labels import LabelError

__all__ = ["DecathlonDataset", "read_dataset_json"]


@dataclass(frozen=True)
class DecathlonDataset:
    pairs: list[tuple[Path, Path]]  # (image, label map) of the labelled training cases
    test_images: list[Path]  # imagesTs: unlabelled, not used for metrics
    label_names: tuple[str, ...]  # index = class value, 0 = background
    modality: str  # of the one channel, e.g. "CT", "MRI"


def _label_names(labels: object, where: str) -> tuple[str, ...]:
    if not isinstance(labels, dict) or not labels:
        raise LabelError(f"{where}: 'labels' must map class values to names")
    by_value: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).isdigit() and isinstance(value, str):  # MSD: {"1": "spleen"}
            by_value[int(key)] = value
        elif isinstance(value, int):  # nnU-Net v2: {"spleen": 1}
            by_value[value] = str(key)
        else:
            raise LabelError(f"{where}: label {key!r}: {value!r} is neither MSD's "
                             "'value: name' nor nnU-Net v2's 'name: value' (region-based "
                             "labels are not supported)")
    if sorted(by_value) != list(range(len(by_value))):
        raise LabelError(f"{where}: label values {sorted(by_value)} must be 0..K-1")
    return tuple(by_value[i] for i in range(len(by_value)))


def _entry_path(root: Path, entry: object, key: str, where: str) -> Path:
    if not isinstance(entry, str):
        raise LabelError(f"{where}: {key} {entry!r} is not a path")
    path = (root / entry).resolve()
    if not path.is_file():
        raise LabelError(f"{where}: {key} {entry} does not exist")
    return path


def _v2_pairs(root: Path, ending: str, where: str) -> list[tuple[Path, Path]]:
    pairs = []
    for image in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
        if image.name.startswith("."):
            continue
        case = image.name[: -len(f"_0000{ending}")]
        label = root / "labelsTr" / f"{case}{ending}"
        if not label.is_file():
            raise LabelError(f"{where}: imagesTr/{image.name} has no labelsTr/{label.name}")
        pairs.append((image, label))
    return pairs


def read_dataset_json(root: str | Path) -> DecathlonDataset | None:
    """The Decathlon / nnU-Net dataset of ``root``, or None when it has no ``dataset.json``."""
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        return None
    where = str(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LabelError(f"{where}: not a readable dataset.json ({e})") from e
    if not isinstance(meta, dict):
        raise LabelError(f"{where}: expected a JSON object")
    names = _label_names(meta.get("labels"), where)
    channels = meta.get("modality", meta.get("channel_names"))
    if not isinstance(channels, dict) or not channels:
        raise LabelError(f"{where}: needs 'modality' (MSD) or 'channel_names' (nnU-Net v2)")
    if len(channels) != 1:
        raise LabelError(f"{where}: modality: {len(channels)} channels "
                         f"({', '.join(map(str, channels.values()))}); fine-tuning takes one "
                         "channel (the MiT's 3D input), multi-channel tasks are not supported")
    modality = str(next(iter(channels.values())))
    if "training" in meta:
        if not isinstance(meta["training"], list):
            raise LabelError(f"{where}: 'training' must be a list of image/label pairs")
        pairs = []
        for i, item in enumerate(meta["training"]):
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise LabelError(f"{where}: training[{i}] needs 'image' and 'label'")
            pairs.append((_entry_path(root, item["image"], f"training[{i}].image", where),
                          _entry_path(root, item["label"], f"training[{i}].label", where)))
    else:
        pairs = _v2_pairs(root, str(meta.get("file_ending", ".nii.gz")), where)
    if not pairs:
        raise LabelError(f"{where}: no labelled training case (imagesTr + labelsTr)")
    tests = meta.get("test", [])
    test_images = [(root / t).resolve() for t in tests if isinstance(t, str)]
    return DecathlonDataset(pairs, test_images, names, modality)
