"""classify_parameters: the 2D/3D/shared split, checked by name, by module type and by gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed_unimiss.models import (
    classify_parameters,
    count_by_class,
    dimension_of,
    parameters_of_class,
)
from fed_unimiss.models.head import WeightNormLinear
from fed_unimiss.models.mit import ClsToken, PosEmbed


def test_covers_every_state_dict_entry_with_known_examples(micro):
    classes = classify_parameters(micro)
    assert list(classes) == list(micro.state_dict())
    expected = {
        "backbone.encoder.stem_2d.conv.weight": "2d",
        "backbone.encoder.stem_3d.norm.bias": "3d",
        "backbone.encoder.patch_embed_3d.2.conv.weight": "3d",
        "backbone.encoder.pos_embed_2d.0.weight": "2d",
        "backbone.encoder.stages.0.0.attn.sr_3d.weight": "3d",
        "backbone.encoder.stages.0.0.attn.sr_2d.bias": "2d",
        "backbone.encoder.stages.0.0.attn.norm.weight": "shared",
        "backbone.encoder.stages.3.0.attn.kv.weight": "shared",
        "backbone.encoder.cls_token.weight": "shared",
        "backbone.encoder.cls_proj.0.weight": "shared",
        "backbone.decoder.up_3d.0.bias": "3d",
        "backbone.decoder.pos_embed_2d.2.weight": "2d",
        "backbone.decoder.norm.weight": "shared",
        "head.mlp.0.weight": "shared",
        "head.last_layer.weight_g": "shared",
    }
    for name, cls in expected.items():
        assert classes[name] == cls, name


def test_bare_backbone_and_prefixed_wrappers_classify_alike(micro):
    whole = classify_parameters(micro)
    bare = classify_parameters(micro.backbone)
    assert bare == {k[len("backbone.") :]: v for k, v in whole.items() if k.startswith("backbone.")}
    wrapper = nn.ModuleDict({"student": micro})
    prefixed = classify_parameters(wrapper)
    assert prefixed == {f"student.{k}": v for k, v in whole.items()}


def test_module_types_agree_with_the_name_rule(micro):
    """Independent of names: conv-type modules and positional embeddings are dimension-specific,
    Linear/LayerNorm/CLS/head layers shared (UNIMISS.md's list)."""
    specific = (
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        PosEmbed,
    )
    shared = (nn.Linear, nn.LayerNorm, ClsToken, WeightNormLinear)
    seen = 0
    for mod_name, module in micro.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            cls = dimension_of(f"{mod_name}.{p_name}")
            if isinstance(module, specific):
                is_3d = isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d)) or (
                    isinstance(module, PosEmbed) and len(module.grid) == 3
                )
                assert cls == ("3d" if is_3d else "2d"), mod_name
            else:
                assert isinstance(module, shared), f"unexpected parameter holder {mod_name}"
                assert cls == "shared", mod_name
            seen += 1
    assert seen == len(list(micro.parameters()))


@pytest.mark.parametrize("dims", [2, 3])
def test_forward_backward_touches_only_its_dimension(micro, dims):
    x = torch.randn(2, 3, 64, 64) if dims == 2 else torch.randn(2, 1, 8, 64, 64)
    micro(x).square().mean().backward()
    other = "3d" if dims == 2 else "2d"
    own = f"{dims}d"
    for name, p in micro.named_parameters():
        cls = dimension_of(name)
        if cls == other:
            assert p.grad is None, f"{dims}D step reached {name}"
        elif p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
            assert cls in (own, "shared")


def test_freezing_one_class_stops_exactly_its_gradients(micro):
    frozen = dict(parameters_of_class(micro, "3d"))
    assert set(frozen) == {n for n, _ in micro.named_parameters() if dimension_of(n) == "3d"}
    for p in frozen.values():
        p.requires_grad_(False)
    micro(torch.randn(1, 1, 8, 64, 64)).square().mean().backward()  # a 3D step, 3D frozen
    for name, p in micro.named_parameters():
        if name in frozen:
            assert p.grad is None, name
        elif dimension_of(name) == "shared" and p.requires_grad:
            assert p.grad is not None, name


def test_counts_partition_the_parameters(micro):
    counts = count_by_class(micro)
    assert sum(counts.values()) == sum(p.numel() for p in micro.parameters())
    assert counts["2d"] > 0 and counts["3d"] > counts["2d"] and counts["shared"] > 0


def test_errors():
    with pytest.raises(ValueError, match="marked both _2d and _3d"):
        dimension_of("x.stem_2d.y_3d.weight")
    with pytest.raises(ValueError, match=r"one of \['2d', '3d', 'shared'\], got '2D'"):
        list(parameters_of_class(nn.Linear(2, 2), "2D"))
