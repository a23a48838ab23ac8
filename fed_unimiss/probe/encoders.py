"""The frozen encoder a probe reads: an export, a pretraining checkpoint, or a random MiT.

Every encoder comes back as a module with ``forward_intermediates(x, decoder=False)``; the
probe never reads anything but the encoder's stage maps and CLS tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from fed_unimiss.checkpoint import load_checkpoint
from fed_unimiss.finetune.export import extract_backbone, model_config_from_meta
from fed_unimiss.finetune.load import LoadError, load_pretrained, read_export_config
from fed_unimiss.models.mit import MiT
from fed_unimiss.models.model_config import ModelConfig

__all__ = ["load_encoder", "random_encoder", "sized_config"]


def sized_config(cfg: ModelConfig, input_size: tuple[int, ...]) -> ModelConfig:
    """``cfg`` with the positional-embedding size of this probe's input (2D: square side)."""
    if len(input_size) == 3:
        return dataclasses.replace(cfg, img_size_3d=tuple(input_size))
    return dataclasses.replace(cfg, img_size_2d=int(input_size[0]))


def random_encoder(cfg: ModelConfig, seed: int) -> nn.Module:
    """A MiT with the initialisation pretraining starts from (``init_weights``), seeded."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return MiT(cfg).eval()
    finally:
        torch.random.set_rng_state(generator_state)


def _from_checkpoint(path: Path, which: str) -> nn.Module:
    tensors, meta = load_checkpoint(path)
    where = str(path.with_suffix(".json"))
    cfg = model_config_from_meta(meta, where)
    model = MiT(cfg)
    state = extract_backbone(tensors, which, where)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LoadError(f"{path}: the {which} backbone does not match its recorded model config "
                        f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model


def load_encoder(init: str | Path, which: str, input_size: tuple[int, ...]
                 ) -> tuple[nn.Module, dict]:
    """(encoder in eval mode, where it came from) for an export directory or a checkpoint file.

    An export is loaded at the probe's input size (its positional embeddings resized once);
    a checkpoint keeps its own sizes and is resized at every forward (the same features).
    """
    path = Path(init)
    if path.is_dir():
        meta, _ = read_export_config(path)
        square = len(input_size) == 3 or input_size[0] == input_size[1]
        model = load_pretrained(path, parts="encoder", input_size=input_size if square else None)
        return model.eval(), {"init": "export", "network": meta.get("network"),
                              "preset": meta["model"].get("preset")}
    model = _from_checkpoint(path, which)
    return model.eval(), {"init": "checkpoint", "network": which, "preset": model.config.preset}
