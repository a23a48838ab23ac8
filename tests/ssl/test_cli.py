"""`fed-unimiss pretrain` end to end on phantom folders: checkpoints, metrics, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fed_unimiss.checkpoint import latest_checkpoint, load_checkpoint
from fed_unimiss.cli.main import main
from fed_unimiss.ssl.config import recipe_to_dict


def _pretrain_args(recipe_factory, data, tmp_path) -> list[str]:
    """`pretrain` arguments for a tiny recipe written to tmp_path, checkpointing every 2 steps
    into tmp_path/run."""
    recipe = recipe_factory(steps_per_epoch=2, alternate_interval=1, checkpoint_every=2,
                            log_every=1, threads=1)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    return ["pretrain", "--config", str(config), "--data", str(data), "--out",
            str(tmp_path / "run"), "--no-progress"]


@pytest.mark.slow
def test_pretrain_checkpoints_logs_and_resumes(phantom_dir, tmp_path, recipe_factory, capsys):
    run = tmp_path / "run"
    args = _pretrain_args(recipe_factory, phantom_dir, tmp_path)
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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretrain_in_mixed_precision_resumes_with_finite_state(phantom_dir, tmp_path,
                                                               recipe_factory, capsys, precision):
    run = tmp_path / "run"
    args = _pretrain_args(recipe_factory, phantom_dir, tmp_path) + [
        "--device", "cpu", "--precision", precision]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "4", "--resume"]) == 0
    assert "pretrained steps 2..4 of 8" in capsys.readouterr().out
    tensors, meta = load_checkpoint(latest_checkpoint(run, "ckpt_"))
    assert meta["step"] == 4
    assert all(t.dtype.is_floating_point is False or bool(t.isfinite().all())
               for t in tensors.values())
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".step")} == {
        torch.float32}  # checkpoints stay fp32
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["world_size"] == 1 for r in rows)


def test_pretrain_names_a_device_this_machine_lacks(phantom_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "micro.yaml"
    code = main(["pretrain", "--config", str(config), "--data",
                 str(phantom_dir), "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert code == 2
    assert "--device: device cuda: no CUDA GPU is visible" in capsys.readouterr().err
