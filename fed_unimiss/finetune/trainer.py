"""The fine-tuning recipe: build the task model from an export (or from scratch), train, validate.

``finetune(cfg, init, train_dir, val_dir, out_dir)`` reads like DINO's ``train_dino``: banners
for data, model, optimiser, training loop and the final report. It writes into ``out_dir``:

- ``metrics.json``: final validation metrics at the top level (``dice_mean`` and
  ``dice_per_class`` for segmentation, ``auc`` and ``accuracy`` for classification), the
  per-epoch ``history``, the resolved config and where the initial weights came from;
- ``history.jsonl``: the same per-epoch rows, appended as training goes (for watching a run);
- ``finetuned.safetensors`` + ``finetuned.json``: the fine-tuned task model.

Segmentation validation runs MONAI's sliding-window inference (Gaussian-weighted windows, as
nnU-Net) over whole volumes (or whole 2D images) and reports Dice from confusion counts pooled
over the validation set.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from fed_unimiss.checkpoint import append_jsonl, atomic_write_json, save_checkpoint
from fed_unimiss.config import to_dict
from fed_unimiss.optim import cosine_at, decay_groups

from .cls_model import ClassificationNet
from .config import FinetuneConfig
from .load import load_pretrained, read_export_config
from .losses import SegmentationLoss
from .metrics import DiceCounter, classification_metrics
from .seg_model import SegmentationNet
from .tasks import (
    ClsCase,
    SegCase,
    SegPatchSampler,
    infer_num_classes,
    load_cls_cases,
    load_seg_cases,
    to_network_input,
)

__all__ = ["finetune", "build_task_model", "evaluate_segmentation", "evaluate_classification"]

log = logging.getLogger(__name__)


def build_backbone(cfg: FinetuneConfig, init: str | Path | None) -> tuple[nn.Module, dict]:
    """The pretrained backbone (resized to the task's input size) or a fresh one of ``cfg.model``."""
    import dataclasses

    from fed_unimiss.models import MiT, get_config

    parts = "encoder+decoder" if cfg.is_segmentation else "encoder"
    size = cfg.input_size
    square = cfg.spatial_dims == 3 or size[0] == size[1]
    if init is not None:
        meta, _ = read_export_config(init)
        backbone = load_pretrained(init, parts=parts, input_size=size if square else None)
        info = {"init": "pretrained", "network": meta.get("network"),
                "pretraining": meta.get("pretraining", {}), "preset": meta["model"].get("preset")}
        return backbone, info
    model_cfg = get_config(cfg.model)
    if cfg.spatial_dims == 3:
        model_cfg = dataclasses.replace(model_cfg, img_size_3d=tuple(size))
    else:
        model_cfg = dataclasses.replace(model_cfg, img_size_2d=size[0])
    return MiT(model_cfg), {"init": "scratch", "preset": model_cfg.preset}


def build_task_model(
    cfg: FinetuneConfig, init: str | Path | None, num_classes: int
) -> tuple[nn.Module, dict]:
    """Segmentation or classification network on the backbone; linear mode freezes the backbone."""
    backbone, info = build_backbone(cfg, init)
    if cfg.is_segmentation:
        model: nn.Module = SegmentationNet(backbone, num_classes, cfg.spatial_dims,
                                           cfg.deep_supervision)
    else:
        model = ClassificationNet(backbone, num_classes)
    if cfg.mode == "linear":
        model.backbone.requires_grad_(False)
    return model, info


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (tensors with ndim <= 1)."""
    return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr)


def _lr_at(step: int, total: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up for ``warmup_steps`` (reaching lr at its last step), then cosine to min_lr."""
    return cosine_at(step, cfg.lr, cfg.min_lr, max(total, 1), cfg.warmup_steps,
                     warmup_inclusive=True)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module, cases: list[SegCase], cfg: FinetuneConfig, num_classes: int
) -> dict[str, Any]:
    """Sliding-window prediction of every whole case; Dice pooled over all cases."""
    model.eval()
    counter = DiceCounter(num_classes)
    for case in cases:
        x = to_network_input(case.image)[None]  # (1, C, *spatial)
        logits = sliding_window_inference(x, cfg.input_size, cfg.batch_size, model,
                                          overlap=cfg.sw_overlap, mode="gaussian",
                                          padding_mode="replicate")  # (1, K, *spatial)
        counter.update(logits.argmax(dim=1)[0], torch.from_numpy(case.labels))
    per_class = counter.per_class()
    return {"dice_mean": counter.mean(),
            "dice_per_class": [None if np.isnan(d) else float(d) for d in per_class]}


@torch.no_grad()
def evaluate_classification(
    model: ClassificationNet, cases: list[ClsCase], cfg: FinetuneConfig
) -> dict[str, Any]:
    model.eval()
    probs = []
    for i in range(0, len(cases), cfg.batch_size):
        x = torch.stack([to_network_input(c.image) for c in cases[i:i + cfg.batch_size]])
        probs.append(model(x).softmax(dim=1))
    labels = np.array([c.label for c in cases])
    return classification_metrics(torch.cat(probs).numpy(), labels)


def _cls_batches(cases: list[ClsCase], batch_size: int, rng: np.random.Generator):
    """Endless shuffled batches of (x, y)."""
    while True:
        order = rng.permutation(len(cases))
        for i in range(0, len(order), batch_size):
            chunk = [cases[j] for j in order[i:i + batch_size]]
            x = torch.stack([to_network_input(c.image) for c in chunk])
            yield x, torch.tensor([c.label for c in chunk])


def finetune(
    cfg: FinetuneConfig,
    init: str | Path | None,
    train_dir: str | Path,
    val_dir: str | Path,
    out_dir: str | Path,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Fine-tune on ``train_dir``, validate on ``val_dir``; returns (and writes) the metrics.

    ``model`` replaces the MiT task network with any network of the same contract (logits
    (B, K, *spatial) for segmentation, (B, K) for classification; a list of logits fine to
    coarse in training if it has ``num_outputs`` > 1). Baselines such as a MONAI U-Net then
    train on exactly the same data, patches, steps, optimiser and evaluation; ``init`` must be
    None with it.
    """
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.jsonl").unlink(missing_ok=True)

    # ============ preparing data ... ============
    loader = load_seg_cases if cfg.is_segmentation else load_cls_cases
    train = loader(train_dir, cfg, cfg.num_classes, cfg.label_fraction)
    num_classes = cfg.num_classes or infer_num_classes(train)
    val = loader(val_dir, cfg, num_classes)  # labels outside the range are an error here
    log.info("%s: %d training and %d validation items, %d classes", cfg.task, len(train),
             len(val), num_classes)

    # ============ building the model ... ============
    if model is None:
        model, init_info = build_task_model(cfg, init, num_classes)
    elif init is not None:
        raise ValueError("finetune: pass either init weights or a model, not both")
    else:
        init_info = {"init": "scratch", "network": type(model).__name__}
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model from %s, %.2f M trainable parameters (%s mode)", init_info["init"],
             n_train / 1e6, cfg.mode)

    # ============ loss, optimiser and batches ... ============
    if cfg.is_segmentation:
        criterion: nn.Module = SegmentationLoss(cfg.ce_weight, cfg.dice_weight,
                                                    getattr(model, "num_outputs", 1))
        sampler = SegPatchSampler(train, cfg.input_size, cfg, rng)
        batches = iter(lambda: sampler.sample(cfg.batch_size), None)
    else:
        criterion = nn.CrossEntropyLoss()
        batches = _cls_batches(train, cfg.batch_size, rng)
    optimizer = _optimizer(model, cfg)
    steps = cfg.steps_per_epoch or max(1, math.ceil(len(train) / cfg.batch_size))
    total = steps * cfg.epochs

    # ============ training ... ============
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start, losses = time.perf_counter(), []
        for _ in range(steps):
            lr = _lr_at(step, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = next(batches)
            loss = criterion(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite fine-tuning loss at epoch {epoch}, "
                                         f"step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": lr,
                               "train_seconds": time.perf_counter() - start}
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            row.update(_validate(model, val, cfg, num_classes))
        history.append(row)
        append_jsonl(out_dir / "history.jsonl", row)
        log.info("epoch %d/%d %s", epoch, cfg.epochs, _summary(row))

    # ============ report ... ============
    final = {k: v for k, v in history[-1].items() if k not in ("epoch", "lr", "train_seconds")}
    metrics = {
        "task": cfg.task,
        **final,
        "num_classes": num_classes,
        "history": history,
        "data": {"train_items": len(train), "val_items": len(val),
                 "label_fraction": cfg.label_fraction},
        "init": init_info,
        "config": to_dict(cfg),
    }
    atomic_write_json(out_dir / "metrics.json", _jsonable(metrics))
    save_checkpoint(out_dir, "finetuned", model.state_dict(),
                    {"task": cfg.task, "num_classes": num_classes, "init": init_info,
                     "config": to_dict(cfg)})
    return metrics


def _validate(model, val, cfg, num_classes) -> dict[str, Any]:
    if cfg.is_segmentation:
        return evaluate_segmentation(model, val, cfg, num_classes)
    return evaluate_classification(model, val, cfg)


def _summary(row: dict[str, Any]) -> str:
    keys = ("train_loss", "dice_mean", "auc", "accuracy")
    return " ".join(f"{k}={row[k]:.4f}" for k in keys if isinstance(row.get(k), float))


def _jsonable(obj: Any) -> Any:
    """NaN -> None so metrics.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj

