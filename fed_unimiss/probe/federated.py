"""The probe a site runs on the global model it received: only numbers leave the function.

Every ``probe_every`` rounds a site that holds a labelled probe set probes the global teacher
and student of the round's instruction before it trains, so the numbers describe the global
model the round starts from. The probe set is one labelled folder, split by case into the
k-NN / linear training side and the scored side (``split: patients``). The result is a flat
mapping of the keys of :func:`fed_unimiss.exchange.probe_key` (balanced accuracies) plus the
number of items scored: no path, no case name, no per-item output.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from fed_unimiss import exchange as ex
from fed_unimiss.config import replace
from fed_unimiss.finetune.config import FinetuneConfig
from fed_unimiss.models.model_config import ModelConfig

from .config import ProbeConfig, load_probe_config
from .encoders import encoder_from_state
from .run import ProbeData, probe_encoder

__all__ = ["site_probe_config", "probe_global_state"]


def site_probe_config(task: str, recipe, config: str | Path | None = None) -> ProbeConfig:
    """The probe a site runs: its YAML (``probe.config`` in site.yaml) or, without one, the
    pretraining recipe's own input sizes, spacing and intensity scale. The reply carries the
    mean over the config's seeds (voxel samples; the features are computed once); no random
    row (round 1 probes the initial model, the federation's own reference)."""
    if config is not None:
        cfg = load_probe_config(config)
        data = replace(cfg.data, task=task)
    else:
        cfg = ProbeConfig()
        model, ssl = recipe.model, recipe.ssl
        data = FinetuneConfig(task=task, patch_3d=(ssl.view_depth, ssl.view_size, ssl.view_size),
                              size_2d=model.img_size_2d, ct_spacing=tuple(recipe.data.ct_spacing),
                              hu_scale=recipe.data.hu_scale)
    if data.split == "folders":  # one folder: split it by case
        data = dataclasses.replace(data, split="patients", val_fraction=0.5)
    cfg = dataclasses.replace(cfg, data=data, random_reference=False)
    cfg.validate()
    return cfg


def probe_global_state(state: Mapping[str, Tensor], model: ModelConfig, data: ProbeData,
                       cfg: ProbeConfig) -> dict[str, float]:
    """``{probe_<network>_stage<s>_<kind>: balanced accuracy, probe_items, probe_seconds}`` of
    the teacher and student in ``state`` (``teacher.backbone.*`` / ``student.backbone.*``)."""
    start = time.perf_counter()
    out: dict[str, float] = {}
    for network in ex.PROBE_NETWORKS:
        encoder = encoder_from_state(dict(state), network, model, "the received global state")
        row = probe_encoder(encoder, data, cfg)
        for stage, scores in row["stages"].items():
            for kind in ex.PROBE_KINDS:
                value = scores[kind]["balanced_accuracy"]["mean"]
                out[ex.probe_key(network, int(stage[len("stage"):]), kind)] = float(value)
    out[ex.PROBE_ITEMS] = float(len(data.val))
    out[ex.PROBE_SECONDS] = time.perf_counter() - start
    return out
