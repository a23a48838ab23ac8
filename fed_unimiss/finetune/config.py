"""``FinetuneConfig``: one downstream fine-tuning run as data (``configs/finetune/*.yaml``).

Loaded with :func:`fed_unimiss.config.load_yaml`; CLI flags override single fields through
:func:`fed_unimiss.config.replace`. Defaults follow the UniMiSS downstream protocols (full
fine-tuning, AdamW 1e-4, Dice + CE with deep supervision for segmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fed_unimiss.config import load_yaml

__all__ = ["FinetuneConfig", "load_finetune_config", "TASKS"]

Task = Literal["seg3d", "seg2d", "cls3d", "cls2d"]
TASKS: tuple[str, ...] = ("seg3d", "seg2d", "cls3d", "cls2d")
Split = Literal["folders", "lists", "patients"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run."""

    # seg3d: CT volume segmentation; seg2d: 2D segmentation (PNG pairs or the axial slices of
    # CT pairs); cls3d / cls2d: CT volume / X-ray classification from a file,label CSV.
    task: Task = "seg3d"
    # Classes including background (segmentation) or label values (classification); for
    # multi_label the number of findings. null: from dataset.json / class_names, else max label
    # in the training set + 1 (validation labels beyond it are then an error).
    num_classes: int | None = None
    # Architecture when training from scratch (a preset name or a model YAML); ignored with
    # --init, whose export fixes the architecture.
    model: str = "small"
    # "full" fine-tunes everything (the paper's protocol); "linear" freezes the pretrained
    # backbone and trains only the new layers (a probe of the representation).
    mode: Literal["full", "linear"] = "full"
    epochs: int = 50
    # Optimiser steps per epoch; null = one pass over the (labelled) training items per epoch.
    steps_per_epoch: int | None = None
    batch_size: int = 2
    # AdamW; the reference fine-tunes at 1e-4. Raise it (1e-3) for linear mode or from scratch.
    lr: float = 1e-4
    weight_decay: float = 1e-4
    # Linear warm-up steps, then cosine to min_lr over the run.
    warmup_steps: int = 0
    # ---- how a pretrained start is kept (all ignored from scratch) ----
    # The pretrained backbone's learning rate as a fraction of lr; the new layers train at lr.
    backbone_lr_scale: float = 1.0
    # Layer-wise lr decay (BEiT): each backbone layer trains at lr x backbone_lr_scale x
    # layer_decay ** (its depth below the new layers), the stems least; 1 = every layer alike.
    layer_decay: float = 1.0
    # "pretrained" starts the U-like decoder from the export; "fresh" re-initialises it and
    # keeps only the pretrained encoder (the decoder was trained for the CLS objective only).
    decoder_init: Literal["pretrained", "fresh"] = "pretrained"
    # Train only the new layers for this many first steps (the backbone frozen), then
    # everything: the new layers' random gradients never reach the pretrained weights.
    freeze_backbone_steps: int = 0
    min_lr: float = 1e-6
    # Fraction of labelled training cases used (seeded subset; at least one case).
    label_fraction: float = 1.0
    seed: int = 0
    # 3D training patch (D, H, W), also the sliding-window size; at least the micro minimum
    # (8, 64, 64). Reference pretraining views are 16 x 96 x 96.
    patch_3d: tuple[int, int, int] = (16, 96, 96)
    # 2D training crop / sliding window side, and the resize side for cls2d.
    size_2d: int = 224
    # CT voxel spacing (z, y, x) mm the volumes are resampled to; null keeps native spacing.
    ct_spacing: tuple[float, float, float] | None = (3.0, 1.0, 1.0)
    # CT input = HU / hu_scale, exactly as in pretraining.
    hu_scale: float = 1024.0
    # Clip HU to [low, high] before scaling (a CT intensity window, e.g. [-175, 250] for
    # abdominal organs); null = no clipping, as in pretraining.
    hu_window: tuple[float, float] | None = None
    # How volume intensities become network inputs: "hu" (HU / hu_scale, CT), "zscore" (per
    # volume mean 0, std 1: MR, where values have no absolute meaning), or "auto": from a
    # Decathlon dataset.json's modality (CT -> hu, anything else -> zscore), else "hu".
    intensity: Literal["auto", "hu", "zscore"] = "auto"
    # Probability that a training patch is centred on a foreground voxel (nnU-Net uses 1/3);
    # raise it for tiny organs.
    foreground_prob: float = 0.33
    # Random flips of training patches, per in-plane axis (never the slice axis). Off by default:
    # within a budget of hundreds of steps a flip slows learning more than it regularises
    # (docs/benchmarks.md, "Fine-tuning on real CT"); raise it (0.5, nnU-Net) for long runs.
    flip_prob: float = 0.0
    # Whether labels name a side (left/right kidney): then no flip ever mirrors left and right,
    # since it would swap them (fed_unimiss.finetune.flips). null: from the class names
    # (dataset.json or class_names), lateral when any names a side or when no names are known.
    lateral_labels: bool | None = None
    # Sliding-window overlap at validation (0.5 = nnU-Net); lower is faster.
    sw_overlap: float = 0.5
    deep_supervision: bool = True
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    # ---- classification labels and splits ----
    # Multi-label classification (cls2d / cls3d): one sigmoid per class, BCE loss, per-class and
    # mean AUC (ChestX-ray14). False: one softmax over num_classes, cross-entropy.
    multi_label: bool = False
    # Class (finding) names of a multi-label task, in output order; null = the sorted names
    # found in the training table. A name in a table outside this list is an error. For
    # segmentation without dataset.json: the names of classes 0..K-1 (background first), which
    # metrics.json then reports Dice under.
    class_names: tuple[str, ...] | None = None
    # Segmentation label maps whose values are codes, not 0..K-1 (MM-WHS: 0, 205, 420, ...):
    # the raw value of class 0, 1, ... in order; any other value is an error naming the file.
    label_values: tuple[int, ...] | None = None
    # The table in DIR: "labels.csv" (file,label[,patient]) or NIH's "Data_Entry_2017.csv"
    # (Image Index, Finding Labels with '|', Patient ID), read as it comes.
    label_table: str = "labels.csv"
    # The finding that means "all classes negative" in a multi-label table (NIH's wording).
    negative_label: str = "No Finding"
    # folders: --train and --val are separate folders, used whole. lists: the official split
    # lists train_list / val_list (files in DIR, one image name per line) pick the rows of the
    # --train / --val table. patients: --train and --val are one folder, split here by patient
    # (val_fraction of the patients, seeded); no patient is on both sides.
    split: Split = "folders"
    train_list: str = "train_val_list.txt"
    val_list: str = "test_list.txt"
    val_fraction: float = 0.2
    # Keep classification inputs in memory (fast; ~4 x size_2d^2 bytes per X-ray). false reads
    # every image from disk when it is batched: needed for the 112k X-rays of ChestX-ray14.
    preload: bool = True
    # Clip the gradient norm of all parameters to this value (nnU-Net, the UniMiSS BCV trainer:
    # 12); null = no clipping.
    grad_clip: float | None = None
    # Validate every N epochs (the last epoch is always validated).
    val_every: int = 1
    # torch CPU threads; keep at or below the cores you are given.
    threads: int = 2

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "size_2d", "val_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        least = 1 if self.multi_label else 2
        if self.num_classes is not None and self.num_classes < least:
            raise ValueError(f"num_classes: need at least {least} (or null to infer), got "
                             f"{self.num_classes}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch: must be at least 1 or null, got "
                             f"{self.steps_per_epoch}")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction: expected a fraction in (0, 1], got "
                             f"{self.label_fraction}")
        if any(p < 1 for p in self.patch_3d):
            raise ValueError(f"patch_3d: every side must be >= 1, got {list(self.patch_3d)}")
        if self.ct_spacing is not None and any(s <= 0 for s in self.ct_spacing):
            raise ValueError(f"ct_spacing: expected positive mm values or null, got "
                             f"{list(self.ct_spacing)}")
        for name in ("lr", "hu_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "min_lr", "warmup_steps", "ce_weight", "dice_weight",
                     "freeze_backbone_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("foreground_prob", "flip_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a probability in [0, 1], got "
                                 f"{getattr(self, name)}")
        if self.hu_window is not None and not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window: expected [low, high] with low < high, got "
                             f"{list(self.hu_window)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: expected a fraction in (0, 1), got "
                             f"{self.val_fraction}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip: must be positive or null, got {self.grad_clip}")
        if self.multi_label and self.is_segmentation:
            raise ValueError(f"multi_label: only for cls2d / cls3d, not {self.task}")
        if self.class_names is not None:
            if len(set(self.class_names)) != len(self.class_names) or not self.class_names:
                raise ValueError(f"class_names: expected distinct names, got "
                                 f"{list(self.class_names)}")
            if self.multi_label and self.negative_label in self.class_names:
                raise ValueError(f"class_names: {self.negative_label!r} is the negative_label "
                                 "(all classes negative), not a class")
            if self.num_classes is not None and self.num_classes != len(self.class_names):
                raise ValueError(f"num_classes: {self.num_classes} differs from the "
                                 f"{len(self.class_names)} class_names")
        if self.label_values is not None:
            if len(set(self.label_values)) != len(self.label_values) or len(self.label_values) < 2:
                raise ValueError(f"label_values: expected at least 2 distinct values, got "
                                 f"{list(self.label_values)}")
            for name in ("num_classes", "class_names"):
                value = getattr(self, name)
                n = len(value) if isinstance(value, tuple) else value
                if n is not None and n != len(self.label_values):
                    raise ValueError(f"label_values: {len(self.label_values)} values, but "
                                     f"{name} gives {n} classes")
        for name in ("backbone_lr_scale", "layer_decay"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a fraction in (0, 1], got "
                                 f"{getattr(self, name)}")
        if self.layer_decay != 1 and not self.is_segmentation:
            raise ValueError(f"layer_decay: for segmentation (the MiT's layer map); {self.task} "
                             "fine-tunes the encoder alone: use backbone_lr_scale")
        if self.decoder_init == "fresh" and not self.is_segmentation:
            raise ValueError(f"decoder_init: 'fresh' is for segmentation; {self.task} uses the "
                             "encoder only")
        if not 0 <= self.sw_overlap < 1:
            raise ValueError(f"sw_overlap: expected a value in [0, 1), got {self.sw_overlap}")

    @property
    def spatial_dims(self) -> int:
        return 3 if self.task.endswith("3d") else 2

    @property
    def is_segmentation(self) -> bool:
        return self.task.startswith("seg")

    @property
    def input_size(self) -> tuple[int, ...]:
        """The network input size of training (patch / crop) for this task."""
        return tuple(self.patch_3d) if self.spatial_dims == 3 else (self.size_2d, self.size_2d)


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """Read a fine-tuning YAML (errors name the file and the field)."""
    return load_yaml(FinetuneConfig, path)
