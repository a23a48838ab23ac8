"""Recipes: the shipped YAML files load, round-trip through JSON, and bad fields are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fed_unimiss.config import ConfigError
from fed_unimiss.models import get_config
from fed_unimiss.ssl.config import load_recipe, recipe_from_dict, recipe_to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


@pytest.mark.parametrize("name", ["micro", "tiny", "small"])
def test_shipped_recipes_load_and_round_trip(name):
    recipe = load_recipe(CONFIGS / f"{name}.yaml")
    assert recipe.model.preset == name
    again = recipe_from_dict(json.loads(json.dumps(recipe_to_dict(recipe))))
    assert again == recipe


def test_reference_values_of_the_small_recipe():
    ssl = load_recipe(CONFIGS / "small.yaml").ssl
    assert (ssl.lr, ssl.min_lr, ssl.weight_decay, ssl.weight_decay_end) == (0.0008, 1e-6, 0.04, 0.4)
    assert (ssl.momentum_teacher, ssl.clip_grad, ssl.freeze_last_layer) == (0.996, 0.3, 1)
    assert (ssl.student_temp, ssl.teacher_temp, ssl.center_momentum) == (0.1, 0.04, 0.9)
    assert (ssl.crop_2d, ssl.view_depth, ssl.view_size, ssl.alternate_interval) == (224, 16, 96, 2)


def test_preset_plus_overrides():
    recipe = recipe_from_dict({"model": {"preset": "micro", "head_out_dim": 128}})
    assert recipe.model.head_out_dim == 128
    assert recipe.model.embed_dims == get_config("micro").embed_dims


@pytest.mark.parametrize("data, field", [
    ({"ssl": {"teacher_tmp": 0.04}}, "recipe.ssl.teacher_tmp"),
    ({"ssl": {"batch_size_2d": 0}}, "batch_size_2d"),
    ({"ssl": {"intensity_mode": "voxel"}}, "recipe.ssl.intensity_mode"),
    ({"ssl": {"teacher_centering": "mean"}}, "recipe.ssl.teacher_centering"),
    ({"model": {"preset": "huge"}}, "recipe.model.preset"),
    ({"optim": {}}, "recipe.optim"),
    ({"ssl": {"view_depth": 30}}, "ssl.view_depth"),
])
def test_bad_fields_are_named(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        recipe_from_dict(data)


def test_unreadable_recipe_names_the_file(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("ssl: [1, 2\n")
    with pytest.raises(ConfigError, match="r.yaml"):
        load_recipe(bad)
