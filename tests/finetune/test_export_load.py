"""Export -> load round trip: identical features, resized embeddings, strict loading, no leaks."""

from __future__ import annotations

import json

import pytest
import torch
from micro_checkpoint import micro_checkpoint
from safetensors.torch import load_file, save_file

import fed_unimiss
from fed_unimiss.checkpoint import save_checkpoint
from fed_unimiss.cli.main import main as cli_main
from fed_unimiss.config import to_dict
from fed_unimiss.finetune.export import ExportError, export_checkpoint
from fed_unimiss.finetune.load import LoadError, MiTEncoderModel, load_pretrained
from fed_unimiss.models import MiT, get_config

SECRET_PATH = "/hospital-a/pacs/export/patient-1234"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A federated-style checkpoint of the micro preset with distinct student and teacher."""
    meta = {
        "round": 3,
        "round_log": {"round": 3, "sites": [
            {"name": "A", "samples_2d": 0, "samples_3d": 12, "data": SECRET_PATH},
            {"name": "B", "samples_2d": 30, "samples_3d": 0}]},
        "run": {"num_rounds": 3, "sites": {"A": SECRET_PATH}},
    }
    run = tmp_path_factory.mktemp("run")
    path, student, teacher = micro_checkpoint(run, "global_round_0003", seed=0, meta=meta)
    return path, student, teacher


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    export_checkpoint(checkpoint[0], out, which="student")
    return out


def test_export_writes_weights_and_provenance_without_paths(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["network"] == "student" and config["model"]["preset"] == "micro"
    assert config["pretraining"]["round"] == 3 and config["pretraining"]["kind"] == "federated"
    assert config["pretraining"]["sites"] == ["A", "B"]
    last = config["pretraining"]["last_round"]
    assert last["samples_3d"] == 12 and last["samples_2d"] == 30
    assert last["per_site"]["A"] == {"samples_2d": 0, "samples_3d": 12}
    text = (exported / "config.json").read_text()
    assert SECRET_PATH not in text and "hospital" not in text
    weights = load_file(str(exported / "model.safetensors"))
    assert not any(k.startswith(("head.", "student.", "center")) for k in weights)


@pytest.mark.parametrize("parts", ["encoder", "encoder+decoder"])
def test_loaded_encoder_gives_identical_features(checkpoint, exported, parts):
    _, student, _ = checkpoint
    model = fed_unimiss.load_pretrained(exported, parts=parts)
    assert type(model) is (MiT if parts == "encoder+decoder" else MiTEncoderModel)
    student.eval()
    x3, x2 = torch.randn(1, 1, 8, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for x in (x3, x2):
            for a, b in zip(model.forward_features(x), student.backbone.forward_features(x),
                            strict=True):
                assert torch.equal(a, b)
        if parts == "encoder+decoder":
            assert torch.equal(model(x3), student.backbone(x3))


def test_positional_embeddings_are_resized_to_the_input_size(checkpoint, exported):
    _, student, _ = checkpoint
    model = load_pretrained(exported, parts="encoder+decoder", input_size=(16, 64, 64))
    assert model.config.img_size_3d == (16, 64, 64)
    assert model.encoder.pos_embed_3d[0].weight.shape[1] == 1 + 8 * 16 * 16
    x = torch.randn(1, 1, 16, 64, 64)
    with torch.no_grad():  # resized once at load == resized at run time by the original model
        torch.testing.assert_close(model(x), student.backbone(x), rtol=1e-5, atol=1e-5)
    model2d = load_pretrained(exported, parts="encoder", input_size=(96, 96))
    assert model2d.encoder.pos_embed_2d[0].weight.shape[1] == 1 + 24 * 24


def test_teacher_export_differs_from_student(checkpoint, tmp_path):
    _, student, teacher = checkpoint
    export_checkpoint(checkpoint[0], tmp_path / "t", which="teacher")
    model = load_pretrained(tmp_path / "t", parts="encoder")
    w = model.encoder.stem_3d.conv.weight
    assert torch.equal(w, teacher.backbone.encoder.stem_3d.conv.weight)
    assert not torch.equal(w, student.backbone.encoder.stem_3d.conv.weight)


def test_missing_backbone_keys_are_an_error_naming_them(exported, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((exported / "config.json").read_text())
    weights = load_file(str(exported / "model.safetensors"))
    del weights["encoder.stages.0.0.attn.q.weight"]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(LoadError, match=r"missing backbone tensors \['encoder\.stages\.0\.0\.attn\.q\.weight'\]"):
        load_pretrained(broken, parts="encoder")
    model = load_pretrained(broken, parts="encoder", strict=False)  # logged, kept random
    assert isinstance(model, MiTEncoderModel)
    with pytest.raises(LoadError, match="config.json: missing"):
        load_pretrained(tmp_path, parts="encoder")


def test_export_refuses_a_checkpoint_without_backbone(tmp_path):
    path = save_checkpoint(tmp_path, "ckpt_1", {"center": torch.zeros(1, 4)},
                           {"model": to_dict(get_config("micro"))})
    with pytest.raises(ExportError, match=r"ckpt_1\.json: no 'student\.backbone\.\*' tensors"):
        export_checkpoint(path, tmp_path / "out")


def test_export_cli(checkpoint, tmp_path, capsys):
    code = cli_main(["export", str(checkpoint[0]), "--out", str(tmp_path / "cli"),
                     "--which", "teacher"])
    assert code == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["network"] == "teacher"
    assert cli_main(["export", str(tmp_path / "nope.safetensors"), "--out",
                     str(tmp_path / "x")]) == 2
