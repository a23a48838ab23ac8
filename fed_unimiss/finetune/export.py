"""Export a pretraining checkpoint as a self-contained, publishable model directory.

Input: a checkpoint written by centralized pretraining (``RUN/ckpt_STEP``) or by the federation
(``RUN/global_round_NNNN``): one safetensors file with ``student.*``, ``teacher.*`` and ``center``
plus a JSON sidecar. Output ``DIR``::

    DIR/model.safetensors   the MiT backbone (encoder + decoder) of the chosen network, no head
    DIR/config.json         format version, the full ModelConfig, which network, provenance
    DIR/README.md           the model card, from the run's records (model_card.py)

The DINO projection head and the center are pretraining machinery and are not exported. The
sidecar is *not* copied: it can hold site data paths and run details. Only a whitelist of
aggregate facts goes into ``config.json`` (step, round, site labels, sample counts), so a
published model carries no path, patient identifier or header value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save

from fed_unimiss.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from fed_unimiss.config import ConfigError, to_dict
from fed_unimiss.models.model_config import ModelConfig

from .model_card import model_card

__all__ = ["ExportError", "FORMAT", "export_checkpoint", "model_config_from_meta", "provenance"]

log = logging.getLogger(__name__)

FORMAT = "fed-unimiss-pretrained/1"
BACKBONE = "backbone."
Which = Literal["student", "teacher"]


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message names the file and the fix."""


def _candidate_model_sections(meta: Any, depth: int = 0) -> Iterator[Any]:
    """Mappings stored under a ``model`` key anywhere in the sidecar (breadth-first-ish)."""
    if depth > 4 or not isinstance(meta, dict):
        return
    for key in ("model", "model_config"):
        if isinstance(meta.get(key), dict):
            yield meta[key]
    for key, value in meta.items():
        # A federation's recipe_overrides.model holds a few changed fields, not a model: read
        # as one it would resolve to the default preset and miss the run's real architecture.
        if isinstance(value, dict) and key not in ("model", "model_config", "recipe_overrides"):
            yield from _candidate_model_sections(value, depth + 1)


def model_config_from_meta(meta: dict[str, Any], where: str) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint sidecar (a ``model`` section at any depth).

    Accepts a full ModelConfig mapping or ``{preset: NAME, **overrides}``.
    """
    from fed_unimiss.ssl.config import resolve_model_config

    errors = []
    for section in _candidate_model_sections(meta):
        try:
            return resolve_model_config(section, f"{where}:model")
        except (ConfigError, ValueError) as e:
            errors.append(str(e))
    detail = f" ({errors[0]})" if errors else ""
    raise ExportError(
        f"{where}: the checkpoint sidecar records no usable model configuration{detail}; "
        "pass --model-config with the model YAML the run was pretrained with"
    )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _site_counts(item: Any) -> dict[str, Any]:
    return {k: item[k] for k in ("samples_2d", "samples_3d", "steps")
            if isinstance(item, dict) and _number(item.get(k))}


def provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """Whitelisted aggregate facts of a sidecar: rounds/steps, site labels, sample counts.

    A federated sidecar describes its last round (``round_log``): per-site counts are those of
    that round. Site labels are chosen by hospital IT (e.g. "A") and are not patient data.
    """
    facts: dict[str, Any] = {}
    row = meta.get("round_log") if isinstance(meta.get("round_log"), dict) else {}
    run = meta.get("run") if isinstance(meta.get("run"), dict) else {}
    for key in ("round", "step", "epoch"):
        if _number(meta.get(key)):
            facts[key] = meta[key]
    for src in (meta, run, row):
        for key in ("num_rounds", "rounds", "total_steps"):
            if _number(src.get(key)) and key not in facts:
                facts[key] = src[key]
    sites = row.get("sites", meta.get("sites"))
    per_site = dict(row["per_site"]) if isinstance(row.get("per_site"), dict) else {}
    names: list[str] = []
    if isinstance(sites, dict):
        names = [str(k) for k in sites]
        per_site = per_site or dict(sites)
    elif isinstance(sites, list):
        for i, item in enumerate(sites):
            name = item if isinstance(item, str) else (
                item.get("name") if isinstance(item, dict) else None)
            names.append(str(name if name is not None else i))
            if isinstance(item, dict):
                per_site.setdefault(names[-1], item)
    if names:
        facts["sites"] = [n[:64] for n in names]
    if row:
        last = {k: row[k] for k in ("samples_2d", "samples_3d") if _number(row.get(k))}
        counts = {str(k)[:64]: _site_counts(v) for k, v in per_site.items()}
        if counts:
            last["per_site"] = counts
            for key in ("samples_2d", "samples_3d"):
                last.setdefault(key, sum(c.get(key, 0) for c in counts.values()))
        if last:
            facts["last_round"] = last
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    for key in ("ct_volumes", "xrays"):  # centralized runs: pooled image counts
        if _number(data.get(key)):
            facts[key] = data[key]
    facts["kind"] = "federated" if "round" in facts else "centralized"
    return facts


def extract_backbone(tensors: dict[str, torch.Tensor], which: Which, where: str):
    """``{which}.backbone.*`` tensors with the prefix removed (the MiT state dict)."""
    prefix = f"{which}.{BACKBONE}"
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        found = sorted({k.split(".", 1)[0] for k in tensors})
        raise ExportError(f"{where}: no '{prefix}*' tensors in the checkpoint (top-level names: "
                          f"{', '.join(found) or 'none'}); is this a pretraining checkpoint?")
    return state


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    which: Which = "student",
    model_config: ModelConfig | None = None,
) -> Path:
    """Write ``out_dir/model.safetensors``, ``config.json`` and ``README.md`` (the model card);
    returns ``out_dir``.

    The backbone state is checked against a freshly built MiT of the recorded config (strict:
    missing or unexpected names are an error), so a published model always loads.
    """
    from fed_unimiss.models.mit import MiT

    if which not in ("student", "teacher"):
        raise ExportError(f"--which must be 'student' or 'teacher', got {which!r}")
    checkpoint = Path(checkpoint)
    tensors, meta = load_checkpoint(checkpoint)
    where = str(checkpoint.with_suffix(".json"))
    cfg = model_config or model_config_from_meta(meta, where)
    state = extract_backbone(tensors, which, where)
    reference = MiT(cfg).state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise ExportError(
            f"{checkpoint}: the {which} backbone does not match the recorded model config "
            f"(preset {cfg.preset!r}): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, ref in reference.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ExportError(f"{checkpoint}: {which}.backbone.{name} has shape "
                              f"{tuple(state[name].shape)}, the config expects {tuple(ref.shape)}")
        if not torch.isfinite(state[name]).all():
            raise ExportError(f"{checkpoint}: {which}.backbone.{name} holds NaN/inf values")
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "model.safetensors",
                       save({k: v.contiguous().float() for k, v in state.items()}))
    config = {
        "format": FORMAT,
        "network": which,
        "parts": "encoder+decoder",
        "model": to_dict(cfg),
        "pretraining": provenance(meta),
    }
    atomic_write_json(out_dir / "config.json", config)
    parameters = {part: sum(v.numel() for k, v in state.items() if k.startswith(part + "."))
                  for part in ("encoder", "decoder")}
    card = model_card(checkpoint, meta, config["model"], which, parameters)
    atomic_write_bytes(out_dir / "README.md", card.encode())
    log.info("exported the %s backbone (%d tensors, preset %s) to %s", which, len(state),
             cfg.preset, out_dir)
    return out_dir
