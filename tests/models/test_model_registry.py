"""Presets, parameter counts against the UniMiSS reference, YAML configs and create_model errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fed_unimiss.config import ConfigError, load_yaml
from fed_unimiss.models import (
    MODELS,
    PRESETS,
    ModelConfig,
    UniMiSSNet,
    count_by_class,
    create_model,
    list_presets,
)

REPO = Path(__file__).resolve().parents[2]

# Millions of parameters measured from the reference code (UNIMISS.md).
REFERENCE_COUNTS = {
    "small": dict(
        encoder=28.52, decoder=15.42, backbone=43.94, d2=6.95, d3=20.14, shared=16.86, head=21.66
    ),
    "tiny": dict(
        encoder=13.86, decoder=6.52, backbone=20.38, d2=4.08, d3=10.78, shared=5.53, head=21.66
    ),
}


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("preset", ["small", "tiny"])
def test_parameter_counts_match_reference(preset):
    model = create_model(preset)
    by_class = count_by_class(model.backbone)
    measured = dict(
        encoder=_millions(model.backbone.encoder),
        decoder=_millions(model.backbone.decoder),
        backbone=_millions(model.backbone),
        d2=by_class["2d"] / 1e6,
        d3=by_class["3d"] / 1e6,
        shared=by_class["shared"] / 1e6,
        head=_millions(model.head),
    )
    for key, expected in REFERENCE_COUNTS[preset].items():
        assert measured[key] == pytest.approx(expected, rel=0.005), (preset, key, measured[key])


def test_micro_is_a_few_million_parameters(micro):
    total = _millions(micro)
    assert 1.0 < total < 6.0
    assert micro.head.last_layer.weight_v.shape == (1024, 64)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_config_equals_preset(name):
    assert load_yaml(ModelConfig, REPO / "fed_unimiss" / "models" / "presets" / f"{name}.yaml") == PRESETS[name]


def test_registry_lists_every_preset():
    assert list_presets() == sorted(MODELS) == ["micro", "small", "tiny"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_preset_trains_on_small_2d_and_3d_inputs(name):
    torch.manual_seed(0)
    model = MODELS[name](head_out_dim=64, head_hidden_dim=64)  # small head keeps this cheap
    for x in (torch.randn(2, 3, 64, 64), torch.randn(1, 1, 16, 64, 64)):
        model.zero_grad(set_to_none=True)
        out = model(x)
        assert out.shape == (x.shape[0], 64)
        out.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_create_model_accepts_name_config_and_yaml_path():
    torch.manual_seed(0)
    a = create_model("micro")
    torch.manual_seed(0)
    b = create_model(PRESETS["micro"])
    torch.manual_seed(0)
    c = create_model(str(REPO / "fed_unimiss" / "models" / "presets" / "micro.yaml"))
    assert isinstance(a, UniMiSSNet)
    for other in (b, c):
        assert other.config == a.config
        sd_a, sd_o = a.state_dict(), other.state_dict()
        assert all(torch.equal(sd_a[k], sd_o[k]) for k in sd_a)


def test_overrides_apply_and_none_is_ignored():
    model = create_model("micro", head_out_dim=128, head_weight_norm=None, depths=None)
    assert model.config.head_out_dim == 128
    assert model.config.head_weight_norm is True
    assert model.config.depths == PRESETS["micro"].depths
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)
    # lists from YAML/CLI become tuples like every other config value
    assert create_model("micro", depths=[1, 2, 1, 1]).config.depths == (1, 2, 1, 1)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model preset 'mirco'; did you mean 'micro'\?"):
        create_model("mirco")
    with pytest.raises(ValueError, match="valid presets: micro, small, tiny"):
        create_model("huge")


def test_misspelt_override_is_a_config_error_with_suggestion():
    with pytest.raises(
        ConfigError, match=r"head_out_dims: unknown field; did you mean 'head_out_dim'"
    ):
        create_model("micro", head_out_dims=10)
    with pytest.raises(ConfigError, match=r"head_out_dim: expected an integer, got 'x'"):
        create_model("micro", head_out_dim="x")


def test_inconsistent_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"decoder_dims: must mirror the encoder skips"):
        create_model("micro", decoder_dims=[128, 64, 16])
    with pytest.raises(
        ConfigError, match=r"num_heads\[1\]: 3 heads do not divide embed_dims\[1\] = 64"
    ):
        create_model("micro", num_heads=[1, 3, 4, 6])
    with pytest.raises(ConfigError, match=r"depths: expected 4 values"):
        create_model("micro", depths=[1, 1])
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: x\nsr_ratios: [4, 2, 0, 1]\n")
    with pytest.raises(ConfigError, match=rf"{bad}.*sr_ratios: every value must be >= 1"):
        create_model(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        create_model(tmp_path / "missing.yaml")


def test_create_model_rejects_other_types():
    with pytest.raises(TypeError, match="preset name, a ModelConfig or a YAML path, got int"):
        create_model(3)
