"""Model presets and ``create_model``, the one way the project builds a UniMiSSNet.

``small`` and ``tiny`` are the UniMiSS reference configurations (their parameter counts are
checked against the reference in the tests); ``micro`` is a few-million-parameter model with the
same structure that tests, CI and the demo train on CPU. Each preset is defined once, in
``presets/<name>.yaml`` next to this file; a recipe names it (``model: {preset: micro, ...}``)
and overrides fields through :func:`preset_with_overrides`, as :func:`create_model` does.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fed_unimiss.config import ConfigError, from_dict, load_yaml, to_dict

from .model_config import ModelConfig
from .net import UniMiSSNet

__all__ = ["PRESETS", "MODELS", "list_presets", "get_config", "create_model",
           "preset_with_overrides"]

PRESET_DIR = Path(__file__).parent / "presets"


def _load_presets() -> dict[str, ModelConfig]:
    """``presets/<name>.yaml`` -> ModelConfig: the one source of every preset."""
    return {path.stem: load_yaml(ModelConfig, path) for path in sorted(PRESET_DIR.glob("*.yaml"))}


# small: the reference default ("encoder_small" + "model_small"), 43.9 M backbone, 21.7 M head;
# tiny: the reference "tiny", one block per stage, 20.4 M backbone; micro: same structure,
# narrow and shallow, trains on 2D 64x64 and 3D 8x64x64 in CI.
PRESETS: dict[str, ModelConfig] = _load_presets()


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


def preset_with_overrides(name: str, overrides: Mapping[str, Any], where: str) -> ModelConfig:
    """The preset ``name`` with some fields replaced, validated like YAML fields.

    Raises ``ConfigError`` naming ``where`` for an unknown preset (with a "did you mean") and for
    a misspelt or invalid override.
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{where}.preset: unknown model preset {name!r}{hint} (valid presets: "
            f"{', '.join(list_presets())}; or pass a path to a model YAML file)"
        )
    return from_dict(ModelConfig, {**to_dict(PRESETS[name]), **overrides}, where)


def get_config(preset_or_config: str | Path | ModelConfig, **overrides: Any) -> ModelConfig:
    """Resolve a preset name, a ``ModelConfig`` or a YAML path, then apply overrides.

    Overrides that are ``None`` are ignored (unset CLI flags keep the preset's value); the
    others are type-checked and validated like YAML fields, so a typo raises a ``ConfigError``
    naming the field with a "did you mean".
    """
    changes = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(preset_or_config, ModelConfig):
        base, where = preset_or_config, f"ModelConfig({preset_or_config.preset!r})"
    elif isinstance(preset_or_config, Path) or (
        isinstance(preset_or_config, str) and _looks_like_path(preset_or_config)
    ):
        base, where = load_yaml(ModelConfig, preset_or_config), str(preset_or_config)
    elif isinstance(preset_or_config, str):
        return preset_with_overrides(preset_or_config, changes, "model")
    else:
        raise TypeError(
            "create_model expects a preset name, a ModelConfig or a YAML path, got "
            f"{type(preset_or_config).__name__}"
        )
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
    ``create_model("my_model.yaml", head_weight_norm=False)``.
    """
    cfg = get_config(preset_or_config, **overrides)
    return UniMiSSNet(cfg)

