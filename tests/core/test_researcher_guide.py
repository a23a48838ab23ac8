"""docs/researcher-guide.md, walked as written: every ```bash and ```python block, in order,
from a folder laid out like the repository root (``configs/`` beside ``guide/``).

The walk's MONAI bundle (section 9) is also the test of what a fine-tuned seg3d bundle gives a
MONAI user: metadata and card agree with the fine-tune, and ``monai.bundle run`` writes one
segmentation per input on the input's grid (tests/finetune/test_monai_bundle.py tests the
bundle of a pretrained encoder)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "researcher-guide.md"


def _blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python)\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_has_its_steps():
    kinds = [k for k, _ in _blocks()]
    assert kinds.count("bash") >= 6 and kinds.count("python") == 1


def test_researcher_guide_runs_as_written(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    bin_dir = Path(sys.executable).parent  # the venv: `fed-unimiss` and `python`, as activated
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    for i, (kind, code) in enumerate(_blocks()):
        cmd = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" \
            else [sys.executable, "-c", code]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=1200)
        assert out.returncode == 0, f"block {i} ({kind}):\n{code}\n{out.stderr[-3000:]}"
        if "pretrain --config" in code:  # the final loss line says which loss, as the log does
            assert "mean loss of steps 0..3" in out.stdout, out.stdout
    for run in ("seg3d", "seg2d", "cls2d", "probe"):
        assert (tmp_path / "guide" / run / "metrics.json").is_file()
    # the published formats (section 9): a card in every export, the bundle's segmentation
    assert (tmp_path / "guide" / "model" / "README.md").is_file()
    assert (tmp_path / "guide" / "model-ts" / "encoder.torchscript.pt").is_file()
    _check_seg_bundle(tmp_path / "guide", tmp_path)


def _check_seg_bundle(guide: Path, root: Path) -> None:
    bundle, data = guide / "seg3d-bundle", guide / "val" / "nifti"
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 6
    metrics = json.loads((guide / "seg3d" / "metrics.json").read_text())
    assert meta["eval_metrics"]["mean_dice"] == pytest.approx(metrics["dice_mean"])
    card = (bundle / "docs/README.md").read_text()
    assert f"mean Dice over foreground classes: {metrics['dice_mean']:.4g}" in card
    assert "training items: 4" in card and "validation items: 2" in card
    assert str(root) not in card and "case-0000" not in card
    sources = sorted(data.glob("*.nii.gz"))
    written = sorted((bundle / "eval").glob("*_seg.nii.gz"))
    assert [p.name for p in written] == [s.name.replace(".nii.gz", "_seg.nii.gz") for s in sources]
    for source, out in zip(sources, written, strict=True):
        image, seg = nib.load(source), nib.load(out)
        labels = np.asarray(seg.dataobj).squeeze()
        assert labels.shape == image.shape and np.allclose(seg.affine, image.affine)
        assert set(np.unique(labels)) <= set(range(6)) and len(np.unique(labels)) > 1
