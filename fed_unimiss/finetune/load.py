"""``load_pretrained``: an exported model directory -> a plain ``torch.nn.Module``.

No Flower, no checkpoint sidecar, no head: the result is the MiT backbone (``parts=
"encoder+decoder"``) or its encoder alone (``parts="encoder"``), with the same methods
(``forward_features``, ``forward_intermediates``, ``check_input``) either way.

Positional embeddings are stored for the pretraining sizes. Given ``input_size`` (H, W) or
(D, H, W), the matching 2D or 3D embeddings are resized once at load time with the model's own
interpolation (bicubic 2D, trilinear 3D) and the config's ``img_size_*`` updated, so the loaded
module holds parameters of the fine-tuning size and gives exactly the features the pretrained
model computes at that size. Loading is strict: a missing or unexpected backbone tensor is an
error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from fed_unimiss.config import ConfigError, from_dict
from fed_unimiss.models.mit import MiT, MiTEncoder, MiTFeatures, PosEmbed, encoder_grids
from fed_unimiss.models.model_config import ModelConfig

from .export import FORMAT

__all__ = ["load_pretrained", "read_export_config", "MiTEncoderModel", "LoadError"]

log = logging.getLogger(__name__)

Parts = Literal["encoder", "encoder+decoder"]


class LoadError(ValueError):
    """An exported model that cannot be loaded as asked; the message names the file."""


class MiTEncoderModel(nn.Module):
    """The MiT encoder alone, with the same input checks and feature methods as :class:`MiT`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = MiTEncoder(cfg)

    # The input contract is MiT's own; reuse it rather than restate it.
    check_input = MiT.check_input

    def forward_features(self, x: Tensor) -> list[Tensor]:
        self.check_input(x)
        return self.encoder(x)[1]

    def forward_intermediates(self, x: Tensor, decoder: bool = False) -> MiTFeatures:
        if decoder:
            raise ValueError("this model was loaded with parts='encoder'; load "
                             "parts='encoder+decoder' to get decoder features")
        self.check_input(x)
        stem, maps, cls_tokens = self.encoder(x)
        return MiTFeatures(stem, maps, cls_tokens, [], None)

    def forward(self, x: Tensor) -> Tensor:
        """The last encoder stage's CLS token (B, embed_dims[-1])."""
        return self.forward_intermediates(x).encoder_cls[-1]


def read_export_config(directory: str | Path) -> tuple[dict, ModelConfig]:
    """(config.json as a dict, its ModelConfig) of an exported model directory."""
    path = Path(directory) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: missing; is {directory} a directory written by "
                        "`fed-unimiss export`?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: unreadable ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoadError(f"{path}: not a fed-unimiss export (format {meta.get('format')!r}, "
                        f"expected {FORMAT!r})" if isinstance(meta, dict) else f"{path}: not a mapping")
    try:
        cfg = from_dict(ModelConfig, meta.get("model"), f"{path}:model")
    except ConfigError as e:
        raise LoadError(str(e)) from e
    return meta, cfg


def _resized_config(cfg: ModelConfig, input_size: Sequence[int] | None) -> ModelConfig:
    if input_size is None:
        return cfg
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        if size[0] != size[1]:
            # img_size_2d is one side; a non-square input keeps the stored square embedding
            # and is resized at run time by the model itself.
            raise LoadError(f"input_size {size}: 2D positional embeddings are stored square; "
                            "pass a square size (other sizes are still resized at run time)")
        return dataclasses.replace(cfg, img_size_2d=size[0])
    if len(size) == 3:
        return dataclasses.replace(cfg, img_size_3d=size)
    raise LoadError(f"input_size must be (H, W) or (D, H, W), got {size}")


def _resize_pos_embeds(state: dict[str, Tensor], old: ModelConfig, new: ModelConfig) -> None:
    """Resize stored positional embeddings in ``state`` from ``old`` to ``new`` sizes, in place."""
    for dims, name in ((2, "2d"), (3, "3d")):
        size_old = (old.img_size_2d,) * 2 if dims == 2 else tuple(old.img_size_3d)
        size_new = (new.img_size_2d,) * 2 if dims == 2 else tuple(new.img_size_3d)
        if size_old == size_new:
            continue
        g_old, g_new = encoder_grids(old, dims, size_old), encoder_grids(new, dims, size_new)
        n = len(old.embed_dims)
        # Encoder stage i uses grid i; decoder stage j uses the grid of encoder stage n-2-j.
        plan = [(f"encoder.pos_embed_{name}.{i}.weight", i) for i in range(n)]
        plan += [(f"decoder.pos_embed_{name}.{j}.weight", n - 2 - j) for j in range(n - 1)]
        for key, stage in plan:
            if key not in state:
                continue  # encoder-only load: decoder keys were dropped already
            weight = state[key]
            pe = PosEmbed(weight.shape[-1], g_old[stage])
            with torch.no_grad():
                pe.weight.copy_(weight)
                state[key] = pe.resized(g_new[stage]).detach().clone()


def load_pretrained(
    directory: str | Path,
    parts: Parts = "encoder+decoder",
    input_size: Sequence[int] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load an exported model as a plain module (``MiT`` or :class:`MiTEncoderModel`).

    Args:
        directory: a folder written by ``fed-unimiss export`` (model.safetensors + config.json).
        parts: ``"encoder+decoder"`` (segmentation) or ``"encoder"`` (classification).
        input_size: fine-tuning input size, (H, W) square for 2D or (D, H, W) for 3D; the
            matching positional embeddings are resized to it at load time. None keeps the
            pretraining sizes (other sizes are then interpolated at every forward).
        strict: missing or unexpected tensors are an error (naming them). With False they are
            logged, and missing backbone tensors keep their random initialisation.

    Raises:
        LoadError: the directory, config or tensors are missing, corrupt or do not match.
    """
    if parts not in ("encoder", "encoder+decoder"):
        raise LoadError(f"parts must be 'encoder' or 'encoder+decoder', got {parts!r}")
    directory = Path(directory)
    _, stored_cfg = read_export_config(directory)
    weights = directory / "model.safetensors"
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise LoadError(f"{weights}: missing") from None
    except (OSError, SafetensorError) as e:
        raise LoadError(f"{weights}: corrupt ({e})") from e
    if parts == "encoder":
        state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    cfg = _resized_config(stored_cfg, input_size)
    _resize_pos_embeds(state, stored_cfg, cfg)
    model: nn.Module = MiT(cfg) if parts == "encoder+decoder" else MiTEncoderModel(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if wrong:
        k = wrong[0]
        raise LoadError(f"{weights}: {k} has shape {tuple(state[k].shape)}, the model expects "
                        f"{tuple(expected[k].shape)} ({len(wrong)} mismatching tensor(s))")
    if missing or unexpected:
        msg = (f"{weights}: missing backbone tensors {missing[:8]}"
               f"{' ...' if len(missing) > 8 else ''}; unexpected {unexpected[:8]}")
        if strict:
            raise LoadError(msg)
        log.warning("%s (strict=False: missing tensors keep their random init)", msg)
    model.load_state_dict(state, strict=False)
    log.info("loaded %s (%s, preset %s) from %s", parts, "resized to " + str(tuple(input_size))
             if input_size is not None else "pretraining sizes", cfg.preset, directory)
    return model
