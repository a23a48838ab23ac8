"""The probe recipe: frozen encoder features -> k-NN and linear probe per stage -> metrics.json.

``run_probe(cfg, init, train_dir, val_dir, out_dir)`` reads the labelled folders exactly as
``finetune`` does, probes the given encoder and (unless switched off) a random encoder of the
same shape, and writes ``out_dir/metrics.json``::

    {"task", "num_classes", "class_names", "items": {"train", "val"}, "seconds", "config",
     "encoder": ROW, "random": ROW}
    ROW = {"source": {...}, "stages": {"stage1": {"knn": SCORE, "linear": SCORE}, ...}}
    SCORE = {"balanced_accuracy": {"mean", "low", "high", "n"}, "per_seed": [...],
             "per_class": {name: {"mean", "low", "high", "n"}}}

Seeds: every seed draws its own voxel sample (dense tasks) and its own random reference
encoder. A fixed encoder on a classification task has nothing random left, so its seeds agree.

:func:`probe_encoder` is the in-memory entry (a site probing the global model it received).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fed_unimiss.checkpoint import atomic_write_json
from fed_unimiss.config import to_dict
from fed_unimiss.finetune.trainer import load_task_data
from fed_unimiss.models import get_config

from .classifiers import knn_predict, linear_probe_predict
from .config import ProbeConfig
from .encoders import load_encoder, random_encoder, sized_config
from .features import VoxelSample, dense_features, global_features, num_stages, sample_voxels
from .stats import balanced_accuracy, class_recalls, mean_interval

__all__ = ["ProbeData", "load_probe_data", "probe_encoder", "run_probe", "MAX_PER_CLASS"]

log = logging.getLogger(__name__)

# Sampled voxels kept per class and split: bounds the k-NN's similarity matrix (train x val),
# so the probe takes seconds whatever the number of slices or volumes.
MAX_PER_CLASS = 1000


@dataclass
class ProbeData:
    """The labelled items of both sides, preprocessed as fine-tuning does."""

    train: list
    val: list
    num_classes: int
    class_names: tuple[str, ...] | None
    dense: bool


def load_probe_data(cfg: ProbeConfig, train_dir: str | Path, val_dir: str | Path) -> ProbeData:
    data = load_task_data(cfg.data, Path(train_dir), Path(val_dir))
    return ProbeData(data["train"], data["val"], data["num_classes"], data["names"],
                     cfg.data.is_segmentation)


def _stage_list(cfg: ProbeConfig, encoder: nn.Module) -> list[int]:
    """0-based stage indices to probe (the config names them 1-based, as the paper's tables)."""
    n = num_stages(encoder)
    if cfg.stages is None:
        return list(range(n))
    beyond = [s for s in cfg.stages if not 1 <= s <= n]
    if beyond:
        raise ValueError(f"stages: {beyond} outside the encoder's stages 1..{n}")
    return [s - 1 for s in cfg.stages]


def _samples(data: ProbeData, cfg: ProbeConfig, seed: int) -> tuple[VoxelSample, VoxelSample]:
    return tuple(sample_voxels(cases, cfg.voxels_per_class, MAX_PER_CLASS,
                               np.random.default_rng([seed, side]))
                 for side, cases in enumerate((data.train, data.val)))  # type: ignore[return-value]


def _concat(samples: list[VoxelSample]) -> VoxelSample:
    return VoxelSample(*(np.concatenate([getattr(s, f) for s in samples])
                         for f in ("case", "coords", "labels")))


def _features_per_seed(encoder: nn.Module, cases: list, samples: list[VoxelSample],
                       data: ProbeData, cfg: ProbeConfig) -> list[list[Tensor]]:
    """Features of every seed's sample (dense), from one pass over the cases; or the global
    features of every item, the same for every seed."""
    if not data.dense:
        feats = global_features(encoder, cases, cfg.data, cfg.batch_size)
        return [feats for _ in samples]
    joined = dense_features(encoder, cases, _concat(samples), cfg.data.input_size, cfg.batch_size)
    bounds = np.cumsum([0, *(len(s) for s in samples)])
    return [[f[a:b] for f in joined] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _labels(cases: list, sample: VoxelSample | None, dense: bool) -> Tensor:
    if dense:
        return torch.from_numpy(sample.labels)  # type: ignore[union-attr]
    return torch.tensor([int(c.label) for c in cases])


def _score(pred: Tensor, truth: Tensor, num_classes: int) -> dict[str, Any]:
    p, t = pred.numpy(), truth.numpy()
    return {"balanced_accuracy": balanced_accuracy(p, t, num_classes),
            "per_class": class_recalls(p, t, num_classes)}


def _score_stage(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                 num_classes: int, cfg: ProbeConfig) -> dict[str, dict[str, Any]]:
    knn = knn_predict(train_x, train_y, val_x, num_classes, cfg.k, cfg.temperature)
    linear = linear_probe_predict(train_x, train_y, val_x, num_classes, cfg.linear_steps,
                                  cfg.weight_decay)
    return {"knn": _score(knn, val_y, num_classes), "linear": _score(linear, val_y, num_classes)}


def _seed_scores(encoders: list[nn.Module], data: ProbeData, cfg: ProbeConfig,
                 stages: list[int]) -> list[dict[int, dict]]:
    """Per seed, per stage: the k-NN and linear scores. One encoder serves every seed, or
    there is one encoder per seed (the random reference)."""
    splits = [_samples(data, cfg, seed) for seed in cfg.seeds] if data.dense else \
        [(None, None) for _ in cfg.seeds]
    groups = [(encoders[0], list(range(len(cfg.seeds))))] if len(encoders) == 1 else \
        [(enc, [i]) for i, enc in enumerate(encoders)]
    out: list[dict[int, dict]] = [{} for _ in cfg.seeds]
    for encoder, seeds in groups:
        train_f = _features_per_seed(encoder, data.train, [splits[i][0] for i in seeds], data, cfg)
        val_f = _features_per_seed(encoder, data.val, [splits[i][1] for i in seeds], data, cfg)
        for j, i in enumerate(seeds):
            train_y = _labels(data.train, splits[i][0], data.dense)
            val_y = _labels(data.val, splits[i][1], data.dense)
            for s in stages:
                out[i][s] = _score_stage(train_f[j][s], train_y, val_f[j][s], val_y,
                                         data.num_classes, cfg)
    return out


def _summary(per_seed: list[dict[int, dict]], stages: list[int], names: list[str]
             ) -> dict[str, Any]:
    """Mean and 95 % t-interval over seeds of every score, with the per-seed values."""
    result: dict[str, Any] = {}
    for s in stages:
        stage: dict[str, Any] = {}
        for kind in ("knn", "linear"):
            values = [seed[s][kind] for seed in per_seed]
            stage[kind] = {
                "balanced_accuracy": mean_interval([v["balanced_accuracy"] for v in values]),
                "per_seed": [v["balanced_accuracy"] for v in values],
                "per_class": {name: mean_interval([v["per_class"][c] for v in values])
                              for c, name in enumerate(names)},
            }
        result[f"stage{s + 1}"] = stage
    return result


def _class_names(data: ProbeData) -> list[str]:
    if data.class_names is not None and len(data.class_names) == data.num_classes:
        return [str(n) for n in data.class_names]
    return [str(c) for c in range(data.num_classes)]


def probe_encoder(encoder: nn.Module | list[nn.Module], data: ProbeData, cfg: ProbeConfig
                  ) -> dict[str, Any]:
    """The probe's row for one frozen encoder (or one per seed): ``{"stages": {...}}``."""
    encoders = encoder if isinstance(encoder, list) else [encoder]
    if len(encoders) not in (1, len(cfg.seeds)):
        raise ValueError(f"probe_encoder: {len(encoders)} encoders for {len(cfg.seeds)} seeds")
    was_training = [e.training for e in encoders]
    for e in encoders:
        e.eval()
    try:
        stages = _stage_list(cfg, encoders[0])
        per_seed = _seed_scores(encoders, data, cfg, stages)
    finally:
        for e, mode in zip(encoders, was_training, strict=True):
            e.train(mode)
    return {"stages": _summary(per_seed, stages, _class_names(data))}


def run_probe(cfg: ProbeConfig, init: str | Path | None, train_dir: str | Path,
              val_dir: str | Path, out_dir: str | Path, model: str | None = None
              ) -> dict[str, Any]:
    """Probe ``init`` (an export directory or checkpoint; None: only the random reference of
    preset ``model``) and write ``out_dir/metrics.json``; returns the metrics."""
    cfg.validate()
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    # ============ preparing data ... ============
    data = load_probe_data(cfg, train_dir, val_dir)
    log.info("probe %s: %d training and %d validation items, %d classes", cfg.data.task,
             len(data.train), len(data.val), data.num_classes)
    size = cfg.data.input_size
    metrics: dict[str, Any] = {
        "task": cfg.data.task, "num_classes": data.num_classes, "class_names": _class_names(data),
        "items": {"train": len(data.train), "val": len(data.val)}, "seeds": list(cfg.seeds),
    }
    # ============ the encoder under test ... ============
    if init is not None:
        encoder, source = load_encoder(init, cfg.which, size)
        metrics["encoder"] = {"source": source, **probe_encoder(encoder, data, cfg)}
        arch = encoder.config
    else:
        arch = get_config(model or cfg.data.model)
    # ============ the random reference of the same shape ... ============
    if cfg.random_reference or init is None:
        sized = sized_config(arch, size)
        randoms = [random_encoder(sized, seed) for seed in cfg.seeds]
        metrics["random"] = {"source": {"init": "random", "preset": sized.preset},
                             **probe_encoder(randoms, data, cfg)}
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    metrics["config"] = to_dict(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
