"""The segmentation pipeline can learn: it overfits one labelled volume, and one labelled image.

A pipeline that cannot drive Dice above 0.9 on the very data it trains on has a bug somewhere
between patch sampling, network, loss and inference (issue history: every arm predicted
background only on a real CT). These tests train through the public ``finetune`` entry point on
files written by the data layer, and validate on the same files by whole-image inference.

Measured foreground Dice after the stated steps, seeds 0-2 at 1 and 2 threads (3D seed 2 at 1
thread only): 3D 0.935-0.943 (bone, the thinnest class, 0.85-0.86); 2D 1.00 on the whole
128 px image. A stock MONAI U-Net reached 0.84 on the same 3D volume in 250 steps, ours 0.75-0.79.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fed_unimiss.data.phantom import write_phantoms
from fed_unimiss.finetune import FinetuneConfig, finetune

MIN_DICE = 0.9


def _one_volume(root):
    """One labelled phantom torso CT (lung, liver, kidney, bone, maybe a lesion) as NIfTI."""
    write_phantoms(root, 1, 0, labels=True, seed=2, fmt="nifti")  # seed 2: no lesion
    return root


def _one_image(root):
    """The middle axial slice of a labelled phantom torso as an 8-bit PNG + label PNG pair."""
    import nibabel as nib

    write_phantoms(root / "src", 1, 0, labels=True, seed=2, fmt="nifti")
    hu = np.asarray(nib.load(str(root / "src" / "nifti" / "case-0000.nii.gz")).dataobj)
    seg = np.asarray(nib.load(str(root / "src" / "labels" / "seg" / "case-0000.nii.gz")).dataobj)
    # The slice with the most organ classes, then the most organ voxels.
    z = max(range(seg.shape[2]), key=lambda k: (len(np.unique(seg[:, :, k])),
                                                int((seg[:, :, k] > 0).sum())))
    image = np.clip((hu[:, :, z].T + 1000) / 1400 * 255, 0, 255).astype(np.uint8)
    out = root / "pair"
    out.mkdir()
    Image.fromarray(image).resize((128, 128), Image.BILINEAR).save(out / "slice.png")
    Image.fromarray(seg[:, :, z].T.astype(np.uint8)).resize((128, 128), Image.NEAREST).save(
        out / "slice_label.png")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_seg3d_overfits_one_volume(tmp_path, seed):
    data = _one_volume(tmp_path / "ct")
    cfg = FinetuneConfig(task="seg3d", model="micro", epochs=1, steps_per_epoch=500,
                         batch_size=2, lr=2e-3, warmup_steps=10, patch_3d=(8, 48, 48),
                         ct_spacing=(4.0, 6.0, 6.0), foreground_prob=0.5, flip_prob=0.0,
                         sw_overlap=0.25, seed=seed, threads=1)
    m = finetune(cfg, None, data, data, tmp_path / "run")
    assert m["dice_mean"] > MIN_DICE, m["dice_per_class"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_seg2d_overfits_one_image(tmp_path, seed):
    data = _one_image(tmp_path)
    cfg = FinetuneConfig(task="seg2d", model="micro", epochs=1, steps_per_epoch=400,
                         batch_size=2, lr=2e-3, warmup_steps=10, size_2d=128,
                         foreground_prob=0.5, flip_prob=0.0, sw_overlap=0.25, seed=seed,
                         threads=1)
    m = finetune(cfg, None, data, data, tmp_path / "run")
    assert m["dice_mean"] > MIN_DICE, m["dice_per_class"]
