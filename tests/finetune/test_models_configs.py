"""Task networks' output shapes and trainable sets; the shipped fine-tuning YAMLs load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fed_unimiss.config import ConfigError, from_dict
from fed_unimiss.finetune.cls_model import ClassificationNet
from fed_unimiss.finetune.config import FinetuneConfig, load_finetune_config
from fed_unimiss.finetune.seg_model import SegmentationNet
from fed_unimiss.finetune.trainer import build_task_model
from fed_unimiss.models import MiT, get_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "finetune").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_finetune_config(path)
    cfg.validate()


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"label_fraction: expected a fraction in \(0, 1\]"):
        from_dict(FinetuneConfig, {"label_fraction": 0.0})
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        from_dict(FinetuneConfig, {"epoch": 3})


@pytest.mark.parametrize("shape", [(1, 1, 8, 48, 48), (1, 1, 9, 50, 46), (1, 3, 64, 64),
                                   (1, 3, 70, 66)])
def test_segmentation_outputs_cover_the_input(shape):
    torch.manual_seed(0)
    dims = len(shape) - 2
    model = SegmentationNet(MiT(get_config("micro")), 4, dims)
    x = torch.randn(shape)
    outs = model(x)  # training mode: full-size logits first, then coarser deep supervision
    assert outs[0].shape == (1, 4, *shape[2:])
    assert [o.shape[1] for o in outs] == [4] * 5
    sizes = [o.shape[-1] for o in outs]
    assert sizes == sorted(sizes, reverse=True)
    model.eval()
    assert model(x).shape == (1, 4, *shape[2:])
    with pytest.raises(ValueError, match=f"this segmentation model is {dims}D"):
        model(torch.randn(1, 3, 64, 64) if dims == 3 else torch.randn(1, 1, 8, 48, 48))


def test_classifier_uses_cls_and_mean_token():
    model = ClassificationNet(MiT(get_config("micro")), 3)
    assert model.fc.in_features == 2 * 192
    assert model(torch.randn(2, 1, 8, 48, 48)).shape == (2, 3)


def test_linear_mode_trains_only_the_new_layers():
    cfg = FinetuneConfig(task="seg3d", model="micro", mode="linear", patch_3d=(8, 48, 48))
    model, info = build_task_model(cfg, None, num_classes=3)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone" not in trainable and trainable
    assert info["init"] == "scratch"
    assert model.backbone.config.img_size_3d == (8, 48, 48)
