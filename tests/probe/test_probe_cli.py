"""``fed-unimiss probe`` end to end on labelled phantom CT with the micro preset."""

from __future__ import annotations

import json

import pytest
import torch

from fed_unimiss.checkpoint import save_checkpoint
from fed_unimiss.cli.main import main as cli_main
from fed_unimiss.config import to_dict
from fed_unimiss.data.phantom import write_phantoms
from fed_unimiss.finetune.export import export_checkpoint
from fed_unimiss.models import create_model

CONFIG = "configs/probe/seg3d-micro.yaml"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root / "train", n_ct=2, n_xray=0, labels=True, seed=1, fmt="nifti")
    write_phantoms(root / "val", n_ct=2, n_xray=0, labels=True, seed=2, fmt="nifti")
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro pretraining checkpoint (untrained weights: the probe reads any encoder)."""
    torch.manual_seed(5)
    student, teacher = create_model("micro"), create_model("micro")
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    state["center"] = torch.zeros(1, student.config.head_out_dim)
    meta = {"round": 1, "run": {"recipe": {"model": to_dict(student.config)}}}
    return save_checkpoint(tmp_path_factory.mktemp("run"), "global_round_0001", state, meta)


def test_probe_cli_writes_stages_with_intervals_and_a_random_row(phantoms, checkpoint, tmp_path,
                                                                 capsys):
    export = export_checkpoint(checkpoint, tmp_path / "export", which="teacher")
    train, val = phantoms
    out = tmp_path / "probe"
    assert cli_main(["probe", "--init", str(export), "--config", CONFIG, "--train", str(train),
                     "--val", str(val), "--out", str(out), "--threads", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "seg3d" and m["items"] == {"train": 2, "val": 2}
    assert m["seeds"] == [0, 1, 2] and m["encoder"]["source"]["init"] == "export"
    for row in ("encoder", "random"):
        assert list(m[row]["stages"]) == ["stage1", "stage2", "stage3", "stage4"]
        for stage in m[row]["stages"].values():
            for kind in ("knn", "linear"):
                ba = stage[kind]["balanced_accuracy"]
                assert ba["n"] == 3 and ba["low"] <= ba["mean"] <= ba["high"]
                assert 0 <= ba["mean"] <= 1 and len(stage[kind]["per_seed"]) == 3
                assert set(stage[kind]["per_class"]) == {str(c) for c in range(6)}
    # Phantom organs differ in HU: even a random encoder's features beat chance (1/6) clearly.
    assert m["random"]["stages"]["stage1"]["knn"]["balanced_accuracy"]["mean"] > 0.4
    printed = capsys.readouterr().out
    assert "stage4" in printed and "metrics.json" in printed


def test_probe_cli_reads_a_checkpoint_and_refuses_bad_input(phantoms, checkpoint, tmp_path,
                                                            caplog):
    train, val = phantoms
    args = ["--config", CONFIG, "--train", str(train), "--val", str(val), "--threads", "1"]
    out = tmp_path / "ckpt"
    assert cli_main(["probe", "--init", str(checkpoint), "--which", "student", "--no-random",
                     "--seeds", "0", "--stages", "4", *args, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "random" not in m and list(m["encoder"]["stages"]) == ["stage4"]
    assert m["encoder"]["source"] == {"init": "checkpoint", "network": "student",
                                      "preset": "micro"}
    assert cli_main(["probe", "--init", str(tmp_path / "nope"), *args, "--out", str(out)]) == 2
    assert "nope: no such export directory or checkpoint" in caplog.text
    assert cli_main(["probe", "--init", "random", "--stages", "5", *args, "--out", str(out)]) == 2
    assert "stages: [5] outside the encoder's stages 1..4" in caplog.text
