"""How a pretrained start is kept: a fresh decoder, a slower backbone, a frozen warm-up.

Each option is checked on the weights themselves: what it promises to keep is bit-identical to
the export, and what it promises to train has moved.
"""

from __future__ import annotations

import pytest
import torch
from ft_phantoms import write_seg_set
from micro_checkpoint import micro_checkpoint
from safetensors.torch import load_file

from fed_unimiss.finetune import FinetuneConfig, finetune
from fed_unimiss.finetune.export import export_checkpoint
from fed_unimiss.finetune.trainer import _optimizer, build_task_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path, _, _ = micro_checkpoint(tmp_path_factory.mktemp("run"), "ckpt", seed=0)
    out = tmp_path_factory.mktemp("export") / "model"
    export_checkpoint(path, out, which="student")
    return out


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    return write_seg_set(tmp_path_factory.mktemp("seg"), 2, seed=0)


def _cfg(**kw) -> FinetuneConfig:
    base = dict(task="seg3d", num_classes=3, epochs=1, steps_per_epoch=2, batch_size=1,
                lr=1e-3, patch_3d=(8, 48, 48), ct_spacing=None, sw_overlap=0.0, threads=1)
    return FinetuneConfig(**{**base, **kw})


def _backbone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


def test_fresh_decoder_keeps_the_encoder_and_reinitialises_the_decoder(exported):
    stored = load_file(str(exported / "model.safetensors"))
    kept, _ = build_task_model(_cfg(), exported, 3)
    fresh, info = build_task_model(_cfg(decoder_init="fresh"), exported, 3)
    assert info["decoder"] == "fresh"
    kept_sd, fresh_sd = kept.backbone.state_dict(), fresh.backbone.state_dict()
    encoder = [k for k in fresh_sd if k.startswith("encoder.") and "pos_embed" not in k]
    decoder = [k for k in fresh_sd if k.startswith("decoder.") and k.endswith("weight")
               and "pos_embed" not in k and fresh_sd[k].ndim > 1]
    assert encoder and decoder
    assert all(torch.equal(fresh_sd[k], kept_sd[k]) for k in encoder)
    assert all(torch.equal(kept_sd[k], stored[k]) for k in decoder)
    assert not any(torch.equal(fresh_sd[k], stored[k]) for k in decoder)


def _scale_of(model, optimizer) -> dict[str, float]:
    """Every parameter's lr fraction, by name, as the optimizer holds it."""
    by_id = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())  # each parameter in one group
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def test_backbone_learning_rate_is_a_fraction_of_the_new_layers(exported):
    model, _ = build_task_model(_cfg(backbone_lr_scale=0.1), exported, 3)
    scale = _scale_of(model, _optimizer(model, _cfg(backbone_lr_scale=0.1), True))
    assert {s for n, s in scale.items() if n.startswith("backbone.")} == {0.1}
    assert {s for n, s in scale.items() if not n.startswith("backbone.")} == {1.0}
    # from scratch there is nothing to keep: one lr for all
    assert set(_scale_of(model, _optimizer(model, _cfg(backbone_lr_scale=0.1), False))
               .values()) == {1.0}


def test_layer_decay_slows_the_layers_nearest_the_input_most(exported):
    cfg = _cfg(backbone_lr_scale=0.5, layer_decay=0.8)
    model, _ = build_task_model(cfg, exported, 3)
    scale = _scale_of(model, _optimizer(model, cfg, True))
    top = model.backbone.num_layers - 1  # the decoder norm, just below the new layers
    assert scale["backbone.decoder.norm.weight"] == pytest.approx(0.5 * 0.8)
    assert scale["backbone.encoder.stem_3d.conv.weight"] == pytest.approx(0.5 * 0.8 ** (top + 1))
    stage = [scale[f"backbone.encoder.stages.{i}.0.mlp.fc1.weight"] for i in range(4)]
    assert stage == pytest.approx([0.5 * 0.8 ** (top + 1 - (i + 1)) for i in range(4)])
    assert scale["backbone.encoder.patch_embed_3d.2.conv.weight"] == stage[2]  # feeds stage 3
    assert {s for n, s in scale.items() if not n.startswith("backbone.")} == {1.0}
    with pytest.raises(ValueError, match="not a parameter name"):
        model.backbone.layer_of("encoder.nothing")


@pytest.mark.parametrize("frozen, moves", [(2, False), (1, True)])
def test_frozen_warm_up_keeps_the_backbone_until_it_ends(exported, seg_data, tmp_path,
                                                         frozen, moves):
    cfg = _cfg(freeze_backbone_steps=frozen)
    before, _ = build_task_model(cfg, exported, 3)
    start = _backbone_state(before)
    finetune(cfg, exported, seg_data, seg_data, tmp_path / "run")
    after = load_file(str(tmp_path / "run" / "finetuned.safetensors"))
    changed = [k for k, v in start.items() if not torch.equal(after[f"backbone.{k}"], v)]
    assert bool(changed) == moves
    assert not any(torch.equal(after[k], v) for k, v in before.state_dict().items()
                   if k.startswith("cls_conv"))  # the new layers trained all along


def test_options_are_validated():
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        _cfg(backbone_lr_scale=0.0).validate()
    with pytest.raises(ValueError, match="layer_decay: expected a fraction in"):
        _cfg(layer_decay=1.5).validate()
    with pytest.raises(ValueError, match="layer_decay: for segmentation"):
        _cfg(task="cls3d", layer_decay=0.8).validate()
    with pytest.raises(ValueError, match="decoder_init"):
        _cfg(task="cls3d", decoder_init="fresh").validate()
    with pytest.raises(ValueError, match="freeze_backbone_steps"):
        _cfg(freeze_backbone_steps=-1).validate()
