"""``fed-unimiss export --format torchscript``: an encoder file that plain PyTorch loads and runs
in a process that cannot import fed_unimiss, giving the module's stage features."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from micro_checkpoint import micro_checkpoint

from fed_unimiss.cli.main import main as cli_main
from fed_unimiss.finetune.export_torchscript import TORCHSCRIPT_FILE
from fed_unimiss.finetune.load import load_pretrained

# The file is loaded where fed_unimiss cannot be imported: -I (no user site, no PYTHONPATH,
# no cwd on sys.path), a cwd outside the repository, and the package name blocked outright.
STANDALONE = """
import sys
sys.modules["fed_unimiss"] = None
try:
    import fed_unimiss  # noqa
    raise SystemExit("fed_unimiss is importable")
except ImportError:
    pass
import torch
model = torch.jit.load(sys.argv[1])
data = torch.load(sys.argv[2])
out = {name: [t.clone() for t in model(x)] for name, x in data.items()}
torch.save(out, sys.argv[3])
try:
    model(torch.zeros(1, 1, 16, 64, 64))
except Exception as e:
    print("refused:", str(e).splitlines()[-1])
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("ts")
    path, _, _ = micro_checkpoint(base / "run", "global_round_0002", seed=3,
                                  meta={"round": 2})
    out = base / "model"
    assert cli_main(["export", str(path), "--out", str(out), "--format", "torchscript",
                     "--input-size-3d", "8", "48", "48"]) == 0
    return out


def test_torchscript_export_writes_the_file_beside_the_usual_export(exported):
    assert (exported / TORCHSCRIPT_FILE).is_file()
    assert (exported / "model.safetensors").is_file() and (exported / "README.md").is_file()
    assert json.loads((exported / "config.json").read_text())["network"] == "student"


@pytest.mark.slow
def test_torchscript_runs_without_fed_unimiss_and_matches_the_module(exported, tmp_path):
    torch.manual_seed(0)
    inputs = {"2d": torch.rand(2, 3, 64, 64),  # the pretraining 2D size, batch 2
              "3d": torch.randn(1, 1, 8, 48, 48) * 0.5}  # the traced 3D size
    torch.save(inputs, tmp_path / "inputs.pt")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    done = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(exported / TORCHSCRIPT_FILE),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: " in done.stdout and "[8, 48, 48]" in done.stdout
    got = torch.load(tmp_path / "out.pt")
    module = load_pretrained(exported, parts="encoder").eval()
    with torch.no_grad():
        for name, x in inputs.items():
            want = module.forward_features(x)
            assert len(got[name]) == len(want) == 4
            for a, b in zip(got[name], want, strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torchscript_export_refuses_a_size_the_mit_cannot_take(tmp_path):
    path, _, _ = micro_checkpoint(tmp_path / "run", "ckpt_00000001", seed=1)
    code = cli_main(["export", str(path), "--out", str(tmp_path / "m"), "--format",
                     "torchscript", "--input-size-2d", "16", "16"])
    assert code == 2
    assert not (tmp_path / "m" / TORCHSCRIPT_FILE).exists()
