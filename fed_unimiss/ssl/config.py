"""``SSLConfig`` and ``Recipe``: the self-distillation recipe as data.

A recipe YAML (``configs/pretrain/*.yaml``) has three top-level sections::

    model: {preset: micro, head_out_dim: 1024}   # a preset name plus optional ModelConfig overrides
    data:  {...}                                  # fed_unimiss.data.DataConfig
    ssl:   {...}                                  # SSLConfig below

The aggregator resolves a recipe once and sends it to every site as JSON
(:func:`recipe_to_dict` / :func:`recipe_from_dict`), so all sites train exactly the same recipe.
Defaults are the UniMiSS reference (YtongXie/UniMiSS-code, ``main.py``) unless a comment says why
not; docs/pretraining.md lists every deliberate deviation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fed_unimiss.config import ConfigError, from_dict, read_yaml, to_dict
from fed_unimiss.data.config import DataConfig
from fed_unimiss.models.model_config import ModelConfig

__all__ = ["SSLConfig", "Recipe", "load_recipe", "recipe_from_dict", "recipe_to_dict",
           "resolve_model_config"]


@dataclass(frozen=True)
class SSLConfig:
    """Self-distillation hyper-parameters (student/teacher, schedules, views, bookkeeping)."""

    # ---- batches and length ----
    # X-ray images per 2D step. Reference 192 (8 GPUs x 24); the lr scales with it.
    batch_size_2d: int = 192
    # CT sub-volumes per 3D step (each also yields view_depth slices through the 2D path).
    batch_size_3d: int = 192
    # Training length in epochs; the schedules span epochs x steps_per_epoch steps.
    epochs: int = 200
    # Micro-batches per optimizer step (gradient accumulation): a step's batch is cut into this
    # many parts, one forward/backward each, so a recipe's batch fits fewer or smaller devices.
    # The update is the whole batch's; KoLeo and Sinkhorn-Knopp then see one micro-batch at a time.
    accumulate: int = 1
    # Optimizer steps per "epoch". Fixed so that federated sites of different sizes share one
    # schedule (null: centralized pretraining derives it from the data size; a federation must
    # set it).
    steps_per_epoch: int | None = None
    # Epochs per modality block: 2 means 2 X-ray epochs, 2 CT epochs, 2 X-ray, ... (reference 2).
    # A site with only one kind of data trains only that kind every epoch.
    alternate_interval: int = 2
    # ---- optimisation ----
    # Base lr at batch 256; the peak lr of a step is lr x batch/256 of that step's batch size.
    lr: float = 0.0008
    # Final lr of the cosine schedule.
    min_lr: float = 1e-6
    # Linear lr warm-up in epochs (reference 10); capped at the run length for short runs.
    warmup_epochs: int = 10
    # AdamW weight decay, cosine from weight_decay to weight_decay_end; 1-D tensors never decay.
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    # Per-tensor gradient-norm clip (0 disables). Lower it if the loss spikes.
    clip_grad: float = 0.3
    # Epochs during which the head's last layer is frozen; 1 helps the start of training.
    freeze_last_layer: int = 1
    # ---- distillation ----
    # EMA momentum of the teacher, cosine from this to 1. Raise (0.9995) for small batches.
    momentum_teacher: float = 0.996
    # Softmax temperatures; a teacher temperature above 0.07 tends to be unstable.
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    # Momentum of the one shared center buffer (2D, 3D and slice outputs update it).
    center_momentum: float = 0.9
    # How the teacher's targets are kept from collapsing: "center" (DINO/UniMiSS, the running
    # center above) or "sinkhorn" (3 Sinkhorn-Knopp iterations over the batch, DINOv2/SwAV).
    # "sinkhorn" is a micro-recipe deviation for tiny batches of near-identical phantoms, where
    # the centred targets drift to uniform; it needs batches > 1, so not with DP-SGD.
    teacher_centering: Literal["center", "sinkhorn"] = "center"
    # Weight of the KoLeo regulariser (DINOv2) on the student head's bottleneck: spreads a
    # batch's embeddings so the student cannot stay input-invariant. 0 (off) in the reference
    # recipe; a micro-recipe deviation (docs/pretraining.md). Mixes the samples of a batch, so
    # it must stay 0 with DP-SGD.
    koleo_weight: float = 0.0
    # ---- 2D views (X-ray) ----
    # Side of the square 2D crop; 224 reference, small for the micro preset.
    crop_2d: int = 224
    # RandomResizedCrop area fraction range (reference (0.14, 1)).
    crop_scale_2d: tuple[float, float] = (0.14, 1.0)
    # ---- 3D views (CT) ----
    # Slices per 3D view, taken consecutively from the cached tile (reference 16 of 24).
    view_depth: int = 16
    # In-plane side of a 3D view in pixels (reference 96).
    view_size: int = 96
    # Shared in-plane region side = view_size x U(region_factor); both views are cut from it.
    region_factor: tuple[float, float] = (1.4, 1.8)
    # Per-view in-plane crop side = view_size x U(crop_factor), then resized to view_size.
    crop_factor: tuple[float, float] = (0.8, 1.2)
    # Probability of flipping each of the three axes of a 3D view.
    flip_prob_3d: float = 0.8
    # "volume": one draw of noise/blur/brightness/contrast/gamma per view (reference);
    # "slice": an independent draw per slice (harsher, decorrelates slices).
    intensity_mode: Literal["volume", "slice"] = "volume"
    # ---- bookkeeping ----
    # Seeds model init, batch order and every view (derived from (seed, global step)).
    seed: int = 0
    # Steps between metric lines (metrics.jsonl, TensorBoard, collapse watch).
    log_every: int = 10
    # Steps between checkpoints of centralized pretraining (the last step is always saved).
    checkpoint_every: int = 500
    # torch CPU threads; keep at or below the cores you are given.
    threads: int = 2
    # Logged steps the collapse watch compares (the loss trend over this window).
    collapse_window: int = 20

    def validate(self) -> None:
        for name in ("batch_size_2d", "batch_size_3d", "accumulate", "epochs", "alternate_interval",
                     "crop_2d", "view_depth", "view_size", "log_every", "checkpoint_every",
                     "threads", "collapse_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch: must be at least 1 (or null), got "
                             f"{self.steps_per_epoch}")
        for name in ("warmup_epochs", "freeze_last_layer"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "student_temp", "teacher_temp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "weight_decay_end", "clip_grad", "koleo_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("momentum_teacher", "center_momentum", "flip_prob_3d"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1], got {getattr(self, name)}")
        for name in ("crop_scale_2d", "region_factor", "crop_factor"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name}: expected 0 < low <= high, got {[lo, hi]}")
        if self.crop_scale_2d[1] > 1.0:
            raise ValueError(f"crop_scale_2d: the area fraction cannot exceed 1, got "
                             f"{list(self.crop_scale_2d)}")
        if self.crop_factor[1] > self.region_factor[0]:
            raise ValueError(f"crop_factor: its upper bound {self.crop_factor[1]} exceeds the "
                             f"smallest region_factor {self.region_factor[0]}; a view crop must "
                             f"fit inside the shared region")


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a pretraining run: model, data preprocessing, self-distillation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)

    def validate(self) -> None:
        if self.ssl.view_depth > self.data.ct_tile_depth:
            raise ValueError(f"ssl.view_depth: {self.ssl.view_depth} slices do not fit in a "
                             f"cached tile of data.ct_tile_depth={self.data.ct_tile_depth}")


def resolve_model_config(mapping: Any, where: str = "model") -> ModelConfig:
    """``{preset: NAME, **overrides}`` -> ModelConfig: the preset's config with the overrides.

    A mapping whose preset is missing or ``custom`` is read as a full ModelConfig.
    """
    if isinstance(mapping, ModelConfig):
        return mapping
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping (preset plus overrides), got {mapping!r}")
    preset = mapping.get("preset", "custom")
    if preset in (None, "custom"):
        return from_dict(ModelConfig, mapping, where)
    from fed_unimiss.models.registry import preset_with_overrides  # owns the preset table

    overrides = {k: v for k, v in mapping.items() if k != "preset"}
    return preset_with_overrides(str(preset), overrides, where)


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    """Build and validate a Recipe from a plain mapping (YAML or the JSON sent by the aggregator)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with model, data and ssl sections, "
                          f"got {data!r}")
    unknown = sorted(set(data) - {"model", "data", "ssl"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown section (valid: model, data, ssl)")
    model = resolve_model_config(data.get("model"), f"{where}.model")
    data_cfg = from_dict(DataConfig, data.get("data"), f"{where}.data")
    ssl_cfg = from_dict(SSLConfig, data.get("ssl"), f"{where}.ssl")
    recipe = Recipe(model=model, data=data_cfg, ssl=ssl_cfg)
    try:
        recipe.validate()
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as JSON-able data (the model section lists every field)."""
    return {"model": to_dict(recipe.model), "data": to_dict(recipe.data),
            "ssl": to_dict(recipe.ssl)}


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML; errors name the file and the dotted field."""
    path = Path(path)
    return recipe_from_dict(read_yaml(path, "recipe"), str(path))


def with_ssl(recipe: Recipe, **changes: Any) -> Recipe:
    """A copy of ``recipe`` with some SSLConfig fields changed (validated again)."""
    ssl_cfg = dataclasses.replace(recipe.ssl, **changes)
    ssl_cfg.validate()
    return dataclasses.replace(recipe, ssl=ssl_cfg)
