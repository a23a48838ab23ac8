"""docs/researcher-guide.md, walked as written: every ```bash and ```python block, in order,
from a folder laid out like the repository root (``configs/`` beside ``guide/``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
    assert list((tmp_path / "guide" / "seg3d-bundle" / "eval").glob("*_seg.nii.gz"))
