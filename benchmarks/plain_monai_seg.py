"""A plain MONAI 3D segmentation loop: the peer that shares no code with ``fed-unimiss finetune``.

Everything here is MONAI and torch as their tutorials use them - ``LoadImaged``,
``Orientationd``, ``Spacingd``, ``RandCropByPosNegLabeld``, ``UNet``, ``DiceCELoss``,
``sliding_window_inference`` - and nothing imports ``fed_unimiss``. A fault in our fine-tuning
pipeline (sampling, flips, loss, schedule, inference) therefore cannot hit this arm too, which is
what made an earlier comparison blind: both of its arms ran through ``finetune``.

    python benchmarks/plain_monai_seg.py --train DIR --val DIR --num-classes 7 \
        --spacing 4.0 3.2 3.2 --patch 8 48 48 --steps 400 --out result.json

Folders hold ``NAME.nii.gz`` + ``NAME_label.nii.gz``. Spacing and patch are given as (z, y, x),
as ``fed-unimiss finetune`` takes them; intensities are HU / ``--hu-scale`` (no window), as in
pretraining. No flips: the point is a sound plain loop, and flips corrupt lateral labels. The
result is Dice per class from confusion counts pooled over the validation volumes, foreground
mean over the classes present, as ``finetune`` reports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import set_determinism


def pairs(folder: Path) -> list[dict[str, str]]:
    """``{"image", "label"}`` dicts for every NAME.nii.gz with a NAME_label.nii.gz beside it."""
    out = []
    for image in sorted(folder.glob("*.nii.gz")):
        if image.name.endswith("_label.nii.gz"):
            continue
        label = image.with_name(image.name[: -len(".nii.gz")] + "_label.nii.gz")
        if label.exists():
            out.append({"image": str(image), "label": str(label)})
    if not out:
        raise SystemExit(f"{folder}: no NAME.nii.gz + NAME_label.nii.gz pairs")
    return out


def preprocessing(spacing_zyx, hu_scale: float) -> list:
    """Load, RAS, resample to the spacing, HU / hu_scale (MONAI arrays are (C, x, y, z))."""
    keys = ["image", "label"]
    return [LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
            Spacingd(keys, pixdim=tuple(reversed(spacing_zyx)), mode=("bilinear", "nearest")),
            ScaleIntensityRanged("image", a_min=0.0, a_max=hu_scale, b_min=0.0, b_max=1.0),
            EnsureTyped(keys, dtype=(torch.float32, torch.long), track_meta=False)]


def pooled_dice(preds: list[torch.Tensor], labels: list[torch.Tensor], k: int) -> list:
    """Per-class Dice from TP/FP/FN summed over all volumes (NaN where a class is absent)."""
    tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
    for p, t in zip(preds, labels, strict=True):
        for c in range(k):
            pc, tc = p == c, t == c
            tp[c] += int((pc & tc).sum())
            fp[c] += int((pc & ~tc).sum())
            fn[c] += int((~pc & tc).sum())
    denom = 2 * tp + fp + fn
    return [float(2 * tp[c] / denom[c]) if denom[c] else float("nan") for c in range(k)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--val", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--spacing", type=float, nargs=3, required=True, metavar=("Z", "Y", "X"))
    p.add_argument("--patch", type=int, nargs=3, required=True, metavar=("D", "H", "W"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--pos-fraction", type=float, default=0.5,
                   help="share of patches centred on foreground (RandCropByPosNegLabeld)")
    p.add_argument("--hu-scale", type=float, default=1024.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    set_determinism(a.seed)
    patch = tuple(reversed(a.patch))  # (x, y, z) in MONAI's RAS arrays
    start = time.perf_counter()

    pre = preprocessing(a.spacing, a.hu_scale)
    crop = [SpatialPadd(["image", "label"], patch),
            RandCropByPosNegLabeld(["image", "label"], "label", patch, pos=a.pos_fraction,
                                   neg=1 - a.pos_fraction, num_samples=1)]
    model = UNet(spatial_dims=3, in_channels=1, out_channels=a.num_classes,
                 channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        t = (step - a.warmup) / max(1, a.steps - a.warmup)
        return 1e-6 + 0.5 * (a.lr - 1e-6) * (1 + math.cos(math.pi * t))

    # Preprocess every training volume once; the random crop then runs per batch, as
    # CacheDataset would, without its worker machinery.
    cached = [Compose(pre)(d) for d in pairs(a.train)]
    cropper = Compose(crop)
    rng = np.random.default_rng(a.seed)
    cropper.set_random_state(seed=a.seed)
    step, losses = 0, []
    model.train()
    while step < a.steps:
        items = [cropper(cached[int(rng.integers(len(cached)))])[0] for _ in range(a.batch)]
        x = torch.stack([it["image"] for it in items])
        y = torch.stack([it["label"] for it in items])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        step += 1

    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for d in pairs(a.val):
            item = Compose(pre)(d)
            logits = sliding_window_inference(item["image"][None], patch, a.batch, model,
                                              overlap=0.25, mode="gaussian")
            preds.append(logits.argmax(1)[0])
            labels.append(item["label"][0])
    per_class = pooled_dice(preds, labels, a.num_classes)
    fg = [d for d in per_class[1:] if not math.isnan(d)]
    result = {"dice_mean": float(np.mean(fg)) if fg else float("nan"),
              "dice_per_class": [None if math.isnan(d) else d for d in per_class],
              "final_train_loss": float(np.mean(losses[-20:])),
              "seconds": time.perf_counter() - start, "args": {k: str(v) for k, v in
                                                               vars(a).items()}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("dice_mean", "dice_per_class")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
