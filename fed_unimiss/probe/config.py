"""``ProbeConfig``: one frozen-feature probe as data (``configs/probe/*.yaml``).

The data side is a :class:`~fed_unimiss.finetune.config.FinetuneConfig` under ``data:`` (task,
spacing, patch, intensity, label tables), so a probe reads exactly what ``finetune`` reads with
the same preprocessing; the rest are the probe's own knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fed_unimiss.config import load_yaml
from fed_unimiss.finetune.config import FinetuneConfig

__all__ = ["ProbeConfig", "load_probe_config"]


@dataclass(frozen=True)
class ProbeConfig:
    """Hyper-parameters of one probe run (k-NN and linear classifier per encoder stage)."""

    # What to read and how to preprocess it: the fine-tuning config's data fields (task,
    # ct_spacing, patch_3d, size_2d, intensity, hu_window, num_classes, class_names, split ...).
    # Its training fields (epochs, lr, flips) are not used.
    data: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Neighbours of the k-NN vote (DINO: 20) and the temperature of its exp(sim / T) weights.
    k: int = 20
    temperature: float = 0.07
    # Dense tasks: voxels (pixels) sampled per class per volume (image), seeded; a class with
    # fewer voxels contributes all of them. More: a steadier estimate, a slower probe.
    voxels_per_class: int = 64
    # Full-batch L-BFGS iterations of the linear probe (logistic regression on standardised
    # features, class-balanced cross-entropy) and its L2 penalty.
    linear_steps: int = 100
    weight_decay: float = 1e-3
    # Encoder stages probed (0-based); null = every stage.
    stages: tuple[int, ...] | None = None
    # Seeds: each draws its own voxel sample (and its own random reference encoder).
    seeds: tuple[int, ...] = (0, 1, 2)
    # Also probe a randomly initialised encoder of the same shape, the reference row.
    random_reference: bool = True
    # Which network of a pretraining checkpoint (an export fixes its own).
    which: Literal["student", "teacher"] = "student"
    # Windows encoded at once when extracting features.
    batch_size: int = 4
    # torch CPU threads. 1 is fastest on a busy CPU: the probe's operations are small, and
    # threads that wait for each other cost more than they share (measured 3x on 2 cores).
    threads: int = 1

    def validate(self) -> None:
        for name in ("k", "voxels_per_class", "linear_steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be positive, got {self.temperature}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}")
        if self.stages is not None and (not self.stages or min(self.stages) < 0
                                        or len(set(self.stages)) != len(self.stages)):
            raise ValueError(f"stages: expected distinct stage indices >= 0 (or null for all), "
                             f"got {list(self.stages)}")
        if self.data.multi_label:
            raise ValueError("data.multi_label: the probe reports balanced accuracy of one "
                             "class per item; probe single-label tasks")
        self.data.validate()


def load_probe_config(path: str | Path) -> ProbeConfig:
    """Read a probe YAML (errors name the file and the field)."""
    return load_yaml(ProbeConfig, path)
