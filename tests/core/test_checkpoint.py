"""Atomic checkpoints: a crash leaves the previous complete checkpoint readable."""

from __future__ import annotations

import json

import pytest
import torch

from fed_unimiss.checkpoint import (
    CheckpointError,
    append_jsonl,
    atomic_write_bytes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def test_round_trip(tmp_path):
    tensors = {"student.w": torch.randn(3, 4), "center": torch.zeros(1, 8)}
    save_checkpoint(tmp_path, "ckpt_0001", tensors, {"step": 1})
    loaded, meta = load_checkpoint(tmp_path / "ckpt_0001.json")
    assert meta == {"step": 1}
    assert set(loaded) == set(tensors)
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k])


def test_latest_ignores_incomplete_and_foreign_files(tmp_path):
    save_checkpoint(tmp_path, "ckpt_0002", {"a": torch.ones(1)}, {"step": 2})
    save_checkpoint(tmp_path, "ckpt_0010", {"a": torch.ones(1)}, {"step": 10})
    # a crash between the tensors and the sidecar leaves no sidecar: not a checkpoint
    (tmp_path / "ckpt_0011.safetensors").write_bytes(b"partial")
    (tmp_path / "ckpt_best.json").write_text("{}")
    assert latest_checkpoint(tmp_path, "ckpt_") == tmp_path / "ckpt_0010.safetensors"
    assert latest_checkpoint(tmp_path / "empty", "ckpt_") is None


def test_corrupt_files_raise_naming_the_file(tmp_path):
    save_checkpoint(tmp_path, "c", {"a": torch.ones(2)}, {})
    (tmp_path / "c.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="c.safetensors: corrupt"):
        load_checkpoint(tmp_path / "c.safetensors")
    (tmp_path / "c.json").unlink()
    with pytest.raises(CheckpointError, match="c.json: checkpoint sidecar missing"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_append_jsonl(tmp_path):
    append_jsonl(tmp_path / "log.jsonl", {"round": 1})
    append_jsonl(tmp_path / "log.jsonl", {"round": 2})
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == [{"round": 1}, {"round": 2}]
