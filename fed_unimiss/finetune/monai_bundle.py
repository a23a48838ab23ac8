"""``fed-unimiss export --format monai-bundle``: the model as a MONAI bundle directory.

Medical imaging shares models as MONAI bundles (the MONAI Model Zoo layout)::

    DIR/configs/metadata.json   MONAI bundle metadata: version, changelog, monai / pytorch
                                versions, network_data_format (input and output shapes,
                                intensity conventions)
    DIR/configs/inference.json  network_def (+ for a segmentation model: the NIfTI inference
                                pipeline that ``python -m monai.bundle run`` executes)
    DIR/models/model.pt         the network's state dict (torch.save)
    DIR/docs/README.md          the model card

Two inputs are accepted:

- a pretraining checkpoint (``ckpt_STEP`` / ``global_round_NNNN``): the network is the MiT
  encoder as a 3D feature extractor (:class:`MiTFeatureNet`, output = the last encoder stage's
  feature map); the card is the pretraining card of :mod:`.model_card`;
- a fine-tuned 3D segmentation model (``finetuned.safetensors`` from ``fed-unimiss finetune
  --task seg3d``): the network is :class:`MiTSegmentationNet` and inference.json reads every
  NIfTI of ``dataset_dir``, resamples and scales it as fine-tuning did, runs MONAI's Gaussian
  sliding-window inference and writes one label map per image to ``output_dir``.

The network classes live in this package, so the bundle needs ``fed_unimiss`` importable
(``pip install`` it or put it on PYTHONPATH); the package-free file is
``--format torchscript``. MONAI's own schema check (``verify_metadata``) downloads the schema,
so it is not run here; ``verify_net_in_out`` is (tests/finetune/test_monai_bundle.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fed_unimiss.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from fed_unimiss.config import from_dict, to_dict
from fed_unimiss.models.mit import MiT, encoder_grids
from fed_unimiss.models.model_config import ModelConfig

from .export import ExportError, Which, export_checkpoint
from .load import MiTEncoderModel, load_pretrained
from .model_card import NOT_RECORDED, finetune_card
from .seg_model import SegmentationNet

__all__ = ["BUNDLE_VERSION", "MiTFeatureNet", "MiTSegmentationNet", "export_bundle"]

log = logging.getLogger(__name__)

BUNDLE_VERSION = "0.1.0"
MODULE = "fed_unimiss.finetune.monai_bundle"


def _config(model: dict[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, model, "network_def.model")


class MiTFeatureNet(MiTEncoderModel):
    """The pretrained MiT encoder as a bundle network: ``forward(x)`` -> the last encoder
    stage's feature map (B, embed_dims[-1], *grid); built from the ModelConfig mapping the
    bundle config holds (so ``network_def`` alone defines it)."""

    def __init__(self, model: dict[str, Any]) -> None:
        super().__init__(_config(model))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[-1]


class MiTSegmentationNet(SegmentationNet):
    """A fine-tuned MiT segmentation network as a bundle network: logits (B, classes, *x)."""

    def __init__(self, model: dict[str, Any], num_classes: int, spatial_dims: int = 3) -> None:
        super().__init__(MiT(_config(model)), num_classes, spatial_dims, deep_supervision=False)


# ---------------------------------------------------------------------------------------------
# metadata.json and inference.json
# ---------------------------------------------------------------------------------------------
def _versions() -> dict[str, Any]:
    import monai
    import nibabel
    import numpy

    import fed_unimiss

    return {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"fed-unimiss": fed_unimiss.__version__,
                                      "nibabel": nibabel.__version__},
    }


def _metadata(name: str, description: str, inputs: dict, outputs: dict,
              extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20240725.json",
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "written by fed-unimiss export --format monai-bundle"},
        **_versions(),
        "supported_apps": {},
        "name": name,
        "task": extra.pop("task"),
        "description": description,
        "authors": NOT_RECORDED,
        "copyright": NOT_RECORDED,
        "data_source": "see docs/README.md (counts only; no data ships with the bundle)",
        "data_type": "nibabel",
        "image_classes": inputs["image"]["description"],
        "intended_use": "research: a starting point for fine-tuning or a research segmentation "
                        "model; not a medical device (docs/README.md)",
        "references": ["Xie et al., UniMiSS: Universal Medical Self-Supervised Learning via "
                       "Breaking Dimensionality Barrier, ECCV 2022"],
        **extra,
        "network_data_format": {"inputs": inputs, "outputs": outputs},
    }


def _image_input(shape: list[int], channels: int, intensity: str,
                 window: list[float] | None) -> dict[str, Any]:
    return {"type": "image", "format": "hounsfield", "modality": "CT",
            "num_channels": channels, "spatial_shape": shape, "dtype": "float32",
            "value_range": list(window) if window else [], "is_patch_data": True,
            "channel_def": {"0": "image"}, "description": intensity}


def _write_bundle(out: Path, metadata: dict, inference: dict, state: dict[str, Tensor],
                  card: str) -> Path:
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "configs" / "metadata.json", metadata)
    atomic_write_json(out / "configs" / "inference.json", inference)
    tmp = out / "models" / "model.pt.tmp"
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    tmp.replace(out / "models" / "model.pt")
    atomic_write_bytes(out / "docs" / "README.md", card.encode())
    return out


def _network_items(network_def: dict[str, Any]) -> dict[str, Any]:
    """Config items shared by both kinds: device, network definition, weights loaded."""
    return {
        "imports": ["$import torch", "$import glob", "$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "checkpoint": "$torch.load(os.path.join(@bundle_root, 'models', 'model.pt'), "
                      "map_location=@device, weights_only=True)",
        "load_weights": "$@network.load_state_dict(@checkpoint)",
    }


# ---------------------------------------------------------------------------------------------
# Pretraining checkpoint -> feature-extractor bundle
# ---------------------------------------------------------------------------------------------
def _pretrained_bundle(checkpoint: Path, out: Path, which: Which,
                       model_config: ModelConfig | None) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(checkpoint, tmp, which, model_config)
        encoder = load_pretrained(tmp, parts="encoder")
        card = (Path(tmp) / "README.md").read_text()
    cfg = encoder.config
    size = list(cfg.img_size_3d)
    last = list(encoder_grids(cfg, 3, tuple(size))[-1])
    intensity = "CT in HU / 1024 (no clipping; the recipe's hu_scale), axcodes SPL, " \
                "resampled to the pretraining spacing (docs/README.md); any size the MiT " \
                "takes, spatial_shape is the pretraining size"
    inputs = {"image": _image_input(size, cfg.in_chans_3d, intensity, None)}
    outputs = {"pred": {"type": "image", "format": "features", "num_channels": cfg.embed_dims[-1],
                        "spatial_shape": last, "dtype": "float32", "value_range": [],
                        "is_patch_data": True,
                        "channel_def": {"0": "last encoder stage feature map"}}}
    network_def = {"_target_": f"{MODULE}.MiTFeatureNet", "model": to_dict(cfg)}
    inference = {**_network_items(network_def),
                 "initialize": ["$@load_weights", "$@network.eval()"],
                 "run": ["$print('network', type(@network).__name__, 'loaded')"]}
    metadata = _metadata(
        f"fed-unimiss MiT {cfg.preset} encoder ({which})",
        "UniMiSS-pretrained MiT encoder (3D path) as a feature extractor: input a CT patch, "
        "output the last encoder stage's feature map. Pretrained by self-distillation; see "
        "docs/README.md for how and on what. The network class is fed_unimiss.finetune."
        "monai_bundle.MiTFeatureNet: fed-unimiss must be importable.",
        inputs, outputs, {"task": "feature extraction (self-supervised pretrained backbone)"})
    return _write_bundle(out, metadata, inference, encoder.state_dict(), card)


# ---------------------------------------------------------------------------------------------
# Fine-tuned seg3d model -> segmentation bundle
# ---------------------------------------------------------------------------------------------
def _finetuned_model_config(meta: dict[str, Any], where: str,
                            model_config: ModelConfig | None) -> ModelConfig:
    from fed_unimiss.models import get_config

    ft = meta.get("config") or {}
    preset = (meta.get("init") or {}).get("preset") or ft.get("model")
    if model_config is None:
        if not isinstance(preset, str) or not re.match(r"^[a-z0-9_-]+$", preset):
            raise ExportError(f"{where}: records no model preset (init.preset); pass "
                              "--model-config with the model YAML of the backbone")
        model_config = get_config(preset)
    return dataclasses.replace(model_config, img_size_3d=tuple(ft.get("patch_3d")))


def _segmentation_bundle(checkpoint: Path, out: Path, model_config: ModelConfig | None) -> Path:
    tensors, meta = load_checkpoint(checkpoint)
    where = str(checkpoint.with_suffix(".json"))
    ft = meta.get("config") or {}
    if meta.get("task") != "seg3d":
        raise ExportError(f"{where}: task {meta.get('task')!r}: --format monai-bundle takes a "
                          "pretraining checkpoint or a seg3d fine-tuned model (finetuned."
                          "safetensors of `fed-unimiss finetune --task seg3d`)")
    for key in ("patch_3d", "hu_scale"):
        if ft.get(key) is None:
            raise ExportError(f"{where}: config.{key} is missing; the bundle's inference "
                              "pipeline needs it")
    num_classes = meta.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ExportError(f"{where}: num_classes {num_classes!r} is not a class count >= 2")
    cfg = _finetuned_model_config(meta, where, model_config)
    net = MiTSegmentationNet(to_dict(cfg), num_classes)
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ExportError(f"{checkpoint}: the fine-tuned tensors do not fit a {cfg.preset} "
                          f"segmentation network with {num_classes} classes (missing "
                          f"{missing[:4]}, unexpected {unexpected[:4]}, wrong shape "
                          f"{wrong[:4]}); pass --model-config with the backbone's model YAML")
    metrics = _read_metrics(checkpoint.parent / "metrics.json")
    patch = [int(s) for s in ft["patch_3d"]]
    scale, window = float(ft["hu_scale"]), ft.get("hu_window")
    if ft.get("intensity") == "zscore":
        intensity_tf: dict[str, Any] = {"_target_": "NormalizeIntensityd", "keys": "image"}
        intensity = "per-volume z-score (mean 0, std 1)"
    elif window:
        lo, hi = float(window[0]), float(window[1])
        intensity_tf = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo,
                        "a_max": hi, "b_min": lo / scale, "b_max": hi / scale, "clip": True}
        intensity = f"CT in HU clipped to [{lo:g}, {hi:g}], then / {scale:g}"
    else:
        intensity_tf = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.0,
                        "a_max": scale, "b_min": 0.0, "b_max": 1.0, "clip": False}
        intensity = f"CT in HU / {scale:g} (no clipping)"
    spacing = ft.get("ct_spacing")
    pre = [{"_target_": "LoadImaged", "keys": "image", "image_only": True},
           {"_target_": "EnsureChannelFirstd", "keys": "image"},
           # the readers' layout: slice axis first, rows anterior->posterior, columns R->L
           {"_target_": "Orientationd", "keys": "image", "axcodes": "SPL"}]
    if spacing:
        pre.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(spacing),
                    "mode": "bilinear"})
    pre += [intensity_tf, {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"}]
    network_def = {"_target_": f"{MODULE}.MiTSegmentationNet", "model": to_dict(cfg),
                   "num_classes": num_classes, "spatial_dims": 3}
    inference = {
        **_network_items(network_def),
        "dataset_dir": "$os.path.join(@bundle_root, 'sample_data')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
                    "glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": patch, "sw_batch_size": 1,
                    "overlap": float(ft.get("sw_overlap", 0.5)), "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "image", "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
             "output_postfix": "seg", "output_dtype": "$torch.uint8", "resample": False,
             "separate_folder": False, "print_log": True}]},
        "predict": "$lambda d: @postprocessing({**d, 'pred': @inferer(d['image'][None]"
                   ".to(@device), @network)[0].cpu()})",
        "initialize": ["$@load_weights", "$@network.eval()", "$torch.set_grad_enabled(False)"],
        "run": ["$[@predict(d) for d in @dataset]"],
    }
    recorded = metrics.get("label_names")
    safe_names = None
    if isinstance(recorded, list) and len(recorded) == num_classes:
        safe_names = [n if isinstance(n, str) and re.match(r"^[\w \-]{1,40}$", n)
                      else f"class {i}" for i, n in enumerate(recorded)]
    names = safe_names or [f"class {i}" for i in range(num_classes)]
    inputs = {"image": _image_input(patch, cfg.in_chans_3d, intensity, window)}
    outputs = {"pred": {"type": "image", "format": "segmentation", "num_channels": num_classes,
                        "spatial_shape": patch, "dtype": "float32", "value_range": [],
                        "is_patch_data": True,
                        "channel_def": {str(i): n for i, n in enumerate(names)}}}
    extra: dict[str, Any] = {"task": "3D CT segmentation",
                             "label_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(names)),
                             "pred_classes": ", ".join(names)}
    if isinstance(metrics.get("dice_mean"), (int, float)):
        extra["eval_metrics"] = {"mean_dice": metrics["dice_mean"]}
    metadata = _metadata(
        f"fed-unimiss MiT {cfg.preset} seg3d",
        f"A UniMiSS-pretrained MiT fine-tuned for 3D CT segmentation into {num_classes} "
        "classes. `python -m monai.bundle run --config_file configs/inference.json "
        "--meta_file configs/metadata.json --bundle_root . --dataset_dir DIR --output_dir OUT` "
        "segments every NIfTI in DIR. The network class is "
        "fed_unimiss.finetune.monai_bundle.MiTSegmentationNet: fed-unimiss must be importable.",
        inputs, outputs, extra)
    card = finetune_card(meta, metrics, to_dict(cfg), safe_names,
                         sum(v.numel() for v in expected.values()))
    return _write_bundle(out, metadata, inference, tensors, card)


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def export_bundle(checkpoint: str | Path, out_dir: str | Path, which: Which = "student",
                  model_config: ModelConfig | None = None) -> Path:
    """Write a MONAI bundle for a pretraining checkpoint or a fine-tuned seg3d model.

    Raises:
        ExportError: the checkpoint is neither, or lacks a field the bundle needs (named).
    """
    checkpoint = Path(checkpoint)
    tensors, meta = load_checkpoint(checkpoint)
    out = Path(out_dir)
    if "task" in meta:  # fine-tuning writes task, num_classes, init, config
        return _segmentation_bundle(checkpoint, out, model_config)
    if not any(k.startswith(f"{which}.backbone.") for k in tensors):
        raise ExportError(f"{checkpoint}: neither a pretraining checkpoint ({which}.backbone.* "
                          "tensors) nor a fine-tuned model (finetuned.json with a task)")
    return _pretrained_bundle(checkpoint, out, which, model_config)
