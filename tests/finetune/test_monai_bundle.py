"""``fed-unimiss export --format monai-bundle``: MONAI loads the bundle in a fresh process,
builds the network from its config, gets what ``load_pretrained`` gets and passes
``verify_net_in_out``. A fine-tuned seg3d bundle segmenting NIfTIs through ``monai.bundle run``
is tested where the researcher guide walks it (tests/core/test_researcher_guide.py).
(MONAI's ``verify_metadata`` downloads its schema: not run.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro_checkpoint import micro_checkpoint

from fed_unimiss.checkpoint import save_checkpoint
from fed_unimiss.cli.main import main as cli_main
from fed_unimiss.finetune.load import load_pretrained

REPO = Path(__file__).resolve().parents[2]

# A fresh interpreter: the bundle's network comes from its config alone.
LOAD_AND_RUN = """
import sys, torch
from monai.bundle import ConfigParser, verify_net_in_out
bundle, inputs, out = sys.argv[1:4]
parser = ConfigParser()
parser.read_config(f"{bundle}/configs/inference.json")
parser.read_meta(f"{bundle}/configs/metadata.json")
parser["bundle_root"] = bundle
parser["device"] = "$torch.device('cpu')"
network = parser.get_parsed_content("network")
parser.get_parsed_content("load_weights")
network.eval()
with torch.no_grad():
    torch.save(network(torch.load(inputs)), out)
verify_net_in_out(net_id="network_def", meta_file=f"{bundle}/configs/metadata.json",
                  config_file=f"{bundle}/configs/inference.json", device="cpu")
print("verified", type(network).__name__)
"""




def _python(code: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundle")
    path, _, _ = micro_checkpoint(base / "run", "global_round_0001", seed=5, meta={"round": 1})
    assert cli_main(["export", str(path), "--out", str(base / "bundle"), "--format",
                     "monai-bundle"]) == 0
    assert cli_main(["export", str(path), "--out", str(base / "plain")]) == 0
    return base


def test_bundle_layout_and_metadata(pretrained):
    bundle = pretrained / "bundle"
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt",
                "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "network_data_format", "name", "task", "description"):
        assert key in meta, key
    import monai

    assert meta["monai_version"] == monai.__version__
    assert meta["version"] in meta["changelog"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [8, 64, 64]
    assert "HU / 1024" in image["description"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 192 and pred["spatial_shape"] == [1, 2, 2]
    assert (bundle / "docs/README.md").read_text() == (pretrained / "plain/README.md").read_text()


@pytest.mark.slow
def test_bundle_loads_in_a_fresh_process_and_matches_load_pretrained(pretrained, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 64, 64) * 0.5
    torch.save(x, tmp_path / "x.pt")
    done = _python(LOAD_AND_RUN, pretrained / "bundle", tmp_path / "x.pt", tmp_path / "y.pt",
                   cwd=tmp_path)
    assert "verified MiTFeatureNet" in done.stdout
    got = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        want = load_pretrained(pretrained / "plain", parts="encoder").eval().forward_features(x)
    torch.testing.assert_close(got, want[-1], atol=1e-5, rtol=1e-5)


def test_bundle_refuses_what_it_cannot_package(tmp_path):
    path = save_checkpoint(tmp_path, "finetuned", {"w": torch.zeros(2)},
                           {"task": "cls2d", "num_classes": 2, "config": {}})
    assert cli_main(["export", str(path), "--out", str(tmp_path / "b"), "--format",
                     "monai-bundle"]) == 2
    other = save_checkpoint(tmp_path, "other", {"w": torch.zeros(2)}, {"step": 1})
    assert cli_main(["export", str(other), "--out", str(tmp_path / "c"), "--format",
                     "monai-bundle"]) == 2
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
