"""The fine-tuning recipe: build the task model from an export (or from scratch), train, validate.

``finetune(cfg, init, train_dir, val_dir, out_dir)`` reads like DINO's ``train_dino``: banners
for data, model, optimiser, training loop and the final report. It writes into ``out_dir``:

- ``metrics.json``: final validation metrics at the top level (``dice_mean`` and
  ``dice_per_class`` for segmentation, with ``dice_per_label`` by name when dataset.json names
  the classes; ``auc`` and ``accuracy`` for classification; for multi-label ``auc`` is the mean
  of ``auc_per_class``, next to average precision, no threshold), the per-epoch ``history``, the
  resolved config and where the initial weights came from;
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
from torch import nn

from fed_unimiss.checkpoint import append_jsonl, atomic_write_json, save_checkpoint
from fed_unimiss.config import ConfigError, to_dict
from fed_unimiss.optim import cosine_at, decay_groups
from fed_unimiss.runtime import Runtime, autocast, grad_scaler

from .cls_model import ClassificationNet
from .config import FinetuneConfig
from .flips import flip_axes, labels_are_lateral
from .labels import LabelError
from .load import load_pretrained, read_export_config
from .losses import SegmentationLoss
from .metrics import DiceCounter, classification_metrics, multilabel_metrics
from .seg_model import SegmentationNet
from .splits import check_patient_disjoint
from .tasks import (
    ClsCase,
    SegCase,
    SegPatchSampler,
    cls_input,
    infer_num_classes,
    load_cls_data,
    load_seg_data,
    to_network_input,
)

__all__ = ["finetune", "build_task_model", "load_task_data", "evaluate_segmentation",
           "evaluate_classification"]

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
        if cfg.is_segmentation and cfg.decoder_init == "fresh":
            # A new MiT of the same shape initialises the decoder exactly as from scratch.
            backbone.decoder.load_state_dict(MiT(backbone.config).decoder.state_dict())
            info["decoder"] = "fresh"
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


def _lr_scales(model: nn.Module, cfg: FinetuneConfig, pretrained: bool) -> dict[int, float]:
    """Each trainable parameter's fraction of lr, by ``id``: 1 for the new layers; for a
    pretrained backbone ``backbone_lr_scale`` x ``layer_decay`` ** (its depth below the new
    layers), so the layers nearest the input, the most general ones, move the least."""
    backbone = getattr(model, "backbone", None)
    scales = {id(p): 1.0 for p in model.parameters()}
    if not pretrained or backbone is None:
        return scales
    named = list(backbone.named_parameters())
    if cfg.layer_decay == 1:  # also the only case for an encoder-only backbone (cls tasks)
        depth = {name: 0 for name, _ in named}
    else:
        layer = {name: backbone.layer_of(name) for name, _ in named}
        top = max(layer.values())
        depth = {name: top - layer[name] + 1 for name in layer}
    for name, p in named:
        scales[id(p)] = cfg.backbone_lr_scale * cfg.layer_decay ** depth[name]
    return scales


def _optimizer(model: nn.Module, cfg: FinetuneConfig, pretrained: bool) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (ndim <= 1); each decay group split by the
    parameters' lr fractions (:func:`_lr_scales`), every group recording its ``lr_scale``."""
    scales = _lr_scales(model, cfg, pretrained)
    split = []
    for g in decay_groups(model, cfg.weight_decay):
        by_scale: dict[float, list[tuple[str, nn.Parameter]]] = {}
        for n, p in zip(g["names"], g["params"], strict=True):
            by_scale.setdefault(scales[id(p)], []).append((n, p))
        for scale, named in sorted(by_scale.items(), reverse=True):
            name = g["name"] if len(by_scale) == 1 else f"{g['name']}@{scale:.4g}"
            split.append({**g, "name": name, "names": [n for n, _ in named],
                          "params": [p for _, p in named], "lr_scale": scale})
    return torch.optim.AdamW(split, lr=cfg.lr)


def _lr_at(step: int, total: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up for ``warmup_steps`` (reaching lr at its last step), then cosine to min_lr."""
    return cosine_at(step, cfg.lr, cfg.min_lr, max(total, 1), cfg.warmup_steps,
                     warmup_inclusive=True)


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a parameter-free callable)."""
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    return next((p.device for p in params), torch.device("cpu"))


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module, cases: list[SegCase], cfg: FinetuneConfig, num_classes: int,
    label_names: tuple[str, ...] | None = None, precision: str = "fp32",
) -> dict[str, Any]:
    """Sliding-window prediction of every whole case; Dice pooled over all cases.

    Windows run on the model's device (in ``precision``); the whole-volume logits are
    assembled on the CPU, so a large volume never has to fit on the GPU at once.
    """
    # monai's package import takes ~1.7 s (it loads its data and transform stacks): imported
    # here, so that commands and site processes that never validate a segmentation do not pay for it.
    from monai.inferers import sliding_window_inference

    model.eval()
    device = _device_of(model)
    counter = DiceCounter(num_classes)
    for case in cases:
        x = to_network_input(case.image)[None]  # (1, C, *spatial)
        with autocast(device, precision):
            logits = sliding_window_inference(x, cfg.input_size, cfg.batch_size, model,
                                              overlap=cfg.sw_overlap, mode="gaussian",
                                              padding_mode="replicate", sw_device=device,
                                              device=torch.device("cpu"))  # (1, K, *spatial)
        logits = logits.float()
        counter.update(logits.argmax(dim=1)[0], torch.from_numpy(case.labels))
    per_class = [None if np.isnan(d) else float(d) for d in counter.per_class()]
    out: dict[str, Any] = {"dice_mean": counter.mean(), "dice_per_class": per_class}
    if label_names is not None:  # foreground classes by their dataset.json names
        out["dice_per_label"] = dict(zip(label_names[1:], per_class[1:], strict=True))
    return out


@torch.no_grad()
def evaluate_classification(
    model: ClassificationNet, cases: list[ClsCase], cfg: FinetuneConfig,
    class_names: tuple[str, ...] | None = None, precision: str = "fp32",
) -> dict[str, Any]:
    """Softmax AUC/accuracy, or for multi-label the threshold-free per-class report."""
    model.eval()
    device = _device_of(model)
    probs = []
    for i in range(0, len(cases), cfg.batch_size):
        x = torch.stack([cls_input(c, cfg) for c in cases[i:i + cfg.batch_size]]).to(device)
        with autocast(device, precision):
            logits = model(x).float()
        probs.append((logits.sigmoid() if cfg.multi_label else logits.softmax(dim=1)).cpu())
    scores = torch.cat(probs).numpy()
    if cfg.multi_label:
        return multilabel_metrics(scores, np.stack([c.label for c in cases]), class_names or ())
    return classification_metrics(scores, np.array([c.label for c in cases]))


def _cls_batches(cases: list[ClsCase], cfg: FinetuneConfig, rng: np.random.Generator):
    """Endless shuffled batches of (x, y); y is (B,) classes or (B, K) multi-hot floats."""
    while True:
        order = rng.permutation(len(cases))
        for i in range(0, len(order), cfg.batch_size):
            chunk = [cases[j] for j in order[i:i + cfg.batch_size]]
            x = torch.stack([cls_input(c, cfg) for c in chunk])
            if cfg.multi_label:
                yield x, torch.from_numpy(np.stack([c.label for c in chunk]))
            else:
                yield x, torch.tensor([c.label for c in chunk])


def load_task_data(cfg: FinetuneConfig, train_dir: Path, val_dir: Path) -> dict[str, Any]:
    """Training and validation items of this split, the class count and the class names."""
    if cfg.split == "patients" and train_dir.resolve() != val_dir.resolve():
        raise ConfigError(f"split: 'patients' splits one folder by patient; pass the same DIR "
                         f"as --train and --val (got {train_dir} and {val_dir})")
    if cfg.is_segmentation:
        train_set = load_seg_data(train_dir, cfg, cfg.num_classes, cfg.label_fraction, "train")
        num_classes = cfg.num_classes or (len(train_set.label_names) if train_set.label_names
                                          else infer_num_classes(train_set.cases))
        val_set = load_seg_data(val_dir, cfg, num_classes, side="val")
        if train_dir.resolve() == val_dir.resolve() and cfg.split != "folders":
            check_patient_disjoint(train_set.case_ids, val_set.case_ids, str(train_dir))
        return {"train": train_set.cases, "val": val_set.cases, "num_classes": num_classes,
                "names": train_set.label_names}
    train_cls = load_cls_data(train_dir, cfg, cfg.num_classes, cfg.label_fraction, "train")
    names = train_cls.class_names
    if cfg.multi_label:
        num_classes = len(names)  # type: ignore[arg-type]
        if cfg.num_classes is not None and cfg.num_classes != num_classes:
            raise LabelError(f"num_classes: {cfg.num_classes}, but the training table has "
                             f"{num_classes} findings {list(names)}; set class_names")
    else:
        num_classes = cfg.num_classes or infer_num_classes(train_cls.cases)
    val_cls = load_cls_data(val_dir, cfg, num_classes, side="val", class_names=names)
    check_patient_disjoint([c.patient for c in train_cls.cases],
                           [c.patient for c in val_cls.cases], f"{train_dir} / {val_dir}")
    return {"train": train_cls.cases, "val": val_cls.cases, "num_classes": num_classes,
            "names": names}


def finetune(
    cfg: FinetuneConfig,
    init: str | Path | None,
    train_dir: str | Path,
    val_dir: str | Path,
    out_dir: str | Path,
    model: nn.Module | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Fine-tune on ``train_dir``, validate on ``val_dir``; returns (and writes) the metrics.

    ``model`` replaces the MiT task network with any network of the same contract (logits
    (B, K, *spatial) for segmentation, (B, K) for classification; a list of logits fine to
    coarse in training if it has ``num_outputs`` > 1). Baselines such as a MONAI U-Net then
    train on exactly the same data, patches, steps, optimiser and evaluation; ``init`` must be
    None with it.
    """
    cfg.validate()
    runtime = runtime or Runtime()
    runtime.validate()
    device, precision = runtime.torch_device(), runtime.precision
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.jsonl").unlink(missing_ok=True)

    # ============ preparing data ... ============
    data = load_task_data(cfg, Path(train_dir), Path(val_dir))  # labels out of range: an error
    train, val, num_classes, names = data["train"], data["val"], data["num_classes"], data["names"]
    log.info("%s: %d training and %d validation items, %d classes (split %s)", cfg.task,
             len(train), len(val), num_classes, cfg.split)

    # ============ building the model ... ============
    if model is None:
        model, init_info = build_task_model(cfg, init, num_classes)
    elif init is not None:
        raise ValueError("finetune: pass either init weights or a model, not both")
    else:
        init_info = {"init": "scratch", "network": type(model).__name__}
    model.to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model from %s, %.2f M trainable parameters (%s mode), on %s in %s",
             init_info["init"], n_train / 1e6, cfg.mode, device, precision)

    # ============ loss, optimiser and batches ... ============
    if cfg.is_segmentation:
        criterion: nn.Module = SegmentationLoss(cfg.ce_weight, cfg.dice_weight,
                                                    getattr(model, "num_outputs", 1))
        lateral = labels_are_lateral(cfg.lateral_labels, names)
        axes = flip_axes(cfg.spatial_dims, lateral) if cfg.flip_prob > 0 else ()
        if cfg.flip_prob > 0:
            log.info("flips (p %.2f) along %s: labels are %s", cfg.flip_prob,
                     "anterior-posterior only" if lateral else "both in-plane axes",
                     "lateral" if lateral else "symmetric")
        sampler = SegPatchSampler(train, cfg.input_size, cfg, rng, axes)
        batches = iter(lambda: sampler.sample(cfg.batch_size), None)
    else:
        criterion = nn.BCEWithLogitsLoss() if cfg.multi_label else nn.CrossEntropyLoss()
        batches = _cls_batches(train, cfg, rng)
    pretrained = init_info["init"] == "pretrained"
    optimizer = _optimizer(model, cfg, pretrained)
    # Linear-probe-then-fine-tune: the new layers first learn against a frozen backbone.
    frozen_steps = cfg.freeze_backbone_steps if pretrained and cfg.mode == "full" else 0
    scaler = grad_scaler(device, precision)
    steps = cfg.steps_per_epoch or max(1, math.ceil(len(train) / cfg.batch_size))
    total = steps * cfg.epochs

    # ============ training ... ============
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start, losses = time.perf_counter(), []
        for _ in range(steps):
            if frozen_steps and step in (0, frozen_steps):
                model.backbone.requires_grad_(step == frozen_steps)
            lr = _lr_at(step, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            with autocast(device, precision):
                out = model(x)
            loss = criterion(_as_fp32(out), y)  # the loss in fp32 whatever the forward's dtype
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite fine-tuning loss at epoch {epoch}, "
                                         f"step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if not scaler.is_enabled():  # fp16: the scaler skips steps that overflow
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                    raise FloatingPointError(f"non-finite fine-tuning gradient at epoch "
                                             f"{epoch}, step {step}; lower --lr")
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            step += 1
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": lr,
                               "train_seconds": time.perf_counter() - start}
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            start = time.perf_counter()
            row.update(_validate(model, val, cfg, num_classes, names, precision))
            row["val_seconds"] = time.perf_counter() - start
        history.append(row)
        append_jsonl(out_dir / "history.jsonl", row)
        log.info("epoch %d/%d %s", epoch, cfg.epochs, _summary(row))

    # ============ report ... ============
    final = {k: v for k, v in history[-1].items()
             if k not in ("epoch", "lr", "train_seconds", "val_seconds")}
    metrics = {
        "task": cfg.task,
        **final,
        "num_classes": num_classes,
        **({"label_names" if cfg.is_segmentation else "class_names": list(names)}
           if names is not None else {}),
        "history": history,
        "data": {"train_items": len(train), "val_items": len(val),
                 "label_fraction": cfg.label_fraction},
        "init": init_info,
        "config": to_dict(cfg),
    }
    atomic_write_json(out_dir / "metrics.json", _jsonable(metrics))
    save_checkpoint(out_dir, "finetuned",
                    {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    {"task": cfg.task, "num_classes": num_classes, "init": init_info,
                     "config": to_dict(cfg)})
    return metrics


def _validate(model, val, cfg, num_classes, names, precision) -> dict[str, Any]:
    if cfg.is_segmentation:
        return evaluate_segmentation(model, val, cfg, num_classes, names, precision)
    return evaluate_classification(model, val, cfg, names, precision)


def _as_fp32(out: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Logits (or deep-supervision logits, fine to coarse) as fp32 for the loss."""
    return [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()


def _summary(row: dict[str, Any]) -> str:
    keys = ("train_loss", "dice_mean", "auc", "ap", "accuracy")
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

