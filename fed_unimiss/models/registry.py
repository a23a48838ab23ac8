"""Model presets and ``create_model``, the one way the project builds a UniMiSSNet.

``small`` and ``tiny`` are the UniMiSS reference configurations (their parameter counts are
checked against the reference in the tests); ``micro`` is a few-million-parameter model with the
same structure that tests, CI and the demo train on CPU. Each preset is mirrored by
``configs/model/<name>.yaml`` (a test keeps the two equal).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fed_unimiss.config import ConfigError, from_dict, load_yaml, to_dict

from .model_config import ModelConfig
from .net import UniMiSSNet

__all__ = ["PRESETS", "MODELS", "list_presets", "get_config", "create_model"]

PRESETS: dict[str, ModelConfig] = {
    # The reference default ("encoder_small" + "model_small"): 43.9 M backbone, 21.7 M head.
    "small": ModelConfig(preset="small"),
    # The reference "tiny": one block per stage, 20.4 M backbone.
    "tiny": ModelConfig(preset="tiny", depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1)),
    # Same structure, narrow and shallow: trains on 2D 64x64 and 3D 8x64x64 in CI. The sr ratios
    # fit those grids (16^2 / 4x16x16 at stage 1) and still exercise every sr conv path.
    "micro": ModelConfig(
        preset="micro",
        stem_dim=16,
        embed_dims=(32, 64, 128, 192),
        num_heads=(1, 2, 4, 6),
        depths=(1, 1, 1, 1),
        sr_ratios=(4, 2, 2, 1),
        decoder_dims=(128, 64, 32),
        decoder_heads=(4, 2, 1),
        decoder_depths=(1, 1, 1),
        decoder_sr_ratios=(2, 2, 4),
        img_size_2d=64,
        img_size_3d=(8, 64, 64),
        head_hidden_dim=256,
        head_bottleneck_dim=64,
        head_out_dim=1024,
    ),
}


def _preset_factory(name: str) -> Callable[..., UniMiSSNet]:
    def factory(**overrides: Any) -> UniMiSSNet:
        return create_model(name, **overrides)

    factory.__name__ = f"unimiss_{name}"
    factory.__doc__ = f"UniMiSSNet with the {name!r} preset (keyword overrides as create_model)."
    return factory


# Preset name -> factory; tests parametrize over it, so a new preset is covered automatically.
MODELS: dict[str, Callable[..., UniMiSSNet]] = {name: _preset_factory(name) for name in PRESETS}


def list_presets() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(PRESETS)


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or Path(spec).is_file()


def get_config(preset_or_config: str | Path | ModelConfig, **overrides: Any) -> ModelConfig:
    """Resolve a preset name, a ``ModelConfig`` or a YAML path, then apply overrides.

    Overrides that are ``None`` are ignored (unset CLI flags keep the preset's value); the
    others are type-checked and validated like YAML fields, so a typo raises a ``ConfigError``
    naming the field with a "did you mean".
    """
    if isinstance(preset_or_config, ModelConfig):
        base, where = preset_or_config, f"ModelConfig({preset_or_config.preset!r})"
    elif isinstance(preset_or_config, Path) or (
        isinstance(preset_or_config, str) and _looks_like_path(preset_or_config)
    ):
        base, where = load_yaml(ModelConfig, preset_or_config), str(preset_or_config)
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            close = difflib.get_close_matches(preset_or_config, list(PRESETS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown model preset {preset_or_config!r}{hint} (valid presets: "
                f"{', '.join(list_presets())}; or pass a path to a model YAML file)"
            )
        base, where = PRESETS[preset_or_config], f"preset {preset_or_config!r}"
    else:
        raise TypeError(
            "create_model expects a preset name, a ModelConfig or a YAML path, got "
            f"{type(preset_or_config).__name__}"
        )
    changes = {k: v for k, v in overrides.items() if v is not None}
    if not changes:
        try:
            base.validate()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e
        return base
    return from_dict(ModelConfig, {**to_dict(base), **changes}, where=f"{where} with overrides")


def create_model(preset_or_config: str | Path | ModelConfig, **overrides: Any) -> UniMiSSNet:
    """Build the backbone + projection head that self-distillation trains.

    Examples: ``create_model("micro")``, ``create_model("small", head_out_dim=8192)``,
    ``create_model("configs/model/tiny.yaml", head_weight_norm=False)``.
    """
    cfg = get_config(preset_or_config, **overrides)
    return UniMiSSNet(cfg)

