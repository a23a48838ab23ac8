"""`fed-unimiss pretrain` end to end on phantom folders: checkpoints, metrics, resume, errors."""

from __future__ import annotations

import json

import pytest
import yaml

from fed_unimiss.checkpoint import latest_checkpoint, load_checkpoint
from fed_unimiss.cli.main import main
from fed_unimiss.ssl.config import recipe_to_dict


@pytest.mark.slow
def test_pretrain_checkpoints_logs_and_resumes(phantom_dir, tmp_path, recipe_factory, capsys):
    recipe = recipe_factory(steps_per_epoch=2, alternate_interval=1, checkpoint_every=2,
                            log_every=1, threads=1)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(config), "--data", str(phantom_dir), "--out", str(run),
            "--no-progress"]
    assert main(args + ["--steps", "2"]) == 0
    assert latest_checkpoint(run, "ckpt_").name == "ckpt_00000002.safetensors"
    assert main(args + ["--steps", "3", "--resume"]) == 0
    ckpt = latest_checkpoint(run, "ckpt_")
    tensors, meta = load_checkpoint(ckpt)
    assert meta["step"] == 3 and meta["total_steps"] == 8
    assert meta["schedule"]["phase"] == "3d" and meta["data"]["xrays"] == 6
    assert "center" in tensors and any(k.startswith("optim.") for k in tensors)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert all({"step", "loss", "teacher_entropy", "kl"} <= set(m) for m in lines)
    assert list((run / "tb").iterdir())
    assert "pretrained steps 2..3 of 8" in capsys.readouterr().out
    # nothing identifying in the sidecar: no paths of the data folder
    assert str(phantom_dir) not in ckpt.with_suffix(".json").read_text()


def test_pretrain_bad_config_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("ssl:\n  batch_size_2d: zero\n")
    code = main(["pretrain", "--config", str(config), "--data", str(tmp_path), "--out",
                 str(tmp_path / "run")])
    assert code == 2
    assert "ssl.batch_size_2d" in capsys.readouterr().err


def test_pretrain_missing_data_folder(tmp_path, capsys):
    config = tmp_path / "ok.yaml"
    config.write_text("model: {preset: micro}\n")
    code = main(["pretrain", "--config", str(config), "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "not a directory" in capsys.readouterr().err
