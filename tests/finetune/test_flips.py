"""Augmentation never corrupts a label: no left-right flip where labels name a side.

The unit tests pin which axes a patch may be mirrored along; the learning test trains on a
phantom whose kidneys are labelled by side (``write_phantoms(lateral=True)``: the images are
mirror-symmetric but for the liver, so only position tells the kidneys apart), with flips on,
and asks for both kidneys. A pipeline that mirrored left and right would swap their labels in
half the patches and lose them.
"""

from __future__ import annotations

import numpy as np
import pytest

from fed_unimiss.data.phantom import LATERAL_LABEL_CLASSES, write_phantoms
from fed_unimiss.finetune import FinetuneConfig, finetune
from fed_unimiss.finetune.flips import (
    LEFT_RIGHT_AXIS,
    flip_axes,
    is_lateral_name,
    labels_are_lateral,
)
from fed_unimiss.finetune.tasks import SegCase, SegPatchSampler

LATERAL_NAMES = tuple(LATERAL_LABEL_CLASSES[k] for k in sorted(LATERAL_LABEL_CLASSES))


@pytest.mark.parametrize("name", ["kidney_left", "right_kidney", "RightLung", "Lung L",
                                  "adrenal_gland_right", "Lt kidney", "lung-R"])
def test_names_that_say_a_side(name):
    assert is_lateral_name(name)


@pytest.mark.parametrize("name", ["liver", "spleen", "aorta", "lung", "background", "stomach",
                                  "gallbladder", "portal vein", "lesion"])
def test_names_that_do_not(name):
    assert not is_lateral_name(name)


def test_lateral_from_names_config_or_unknown():
    assert labels_are_lateral(None, ["background", "liver", "kidney_right", "kidney_left"])
    assert not labels_are_lateral(None, ["background", "liver", "kidney", "bone"])
    assert labels_are_lateral(None, None)  # no names: the safe side
    assert not labels_are_lateral(False, LATERAL_NAMES)  # the config decides when it is set
    assert labels_are_lateral(True, ["background", "liver"])


def test_flip_axes_never_the_slice_axis_and_left_right_only_when_symmetric():
    for dims in (2, 3):
        assert flip_axes(dims, lateral=True) == (-2,)
        assert set(flip_axes(dims, lateral=False)) == {LEFT_RIGHT_AXIS, -2}
    with pytest.raises(ValueError):
        flip_axes(1, lateral=True)


def test_default_config_flips_nothing():
    assert FinetuneConfig().flip_prob == 0.0


def _ramp_case() -> SegCase:
    """A volume whose value is its column index: a left-right mirror reverses every row."""
    image = np.broadcast_to(np.arange(16, dtype=np.float32), (4, 16, 16)).copy()
    return SegCase(image, np.zeros(image.shape, np.int64), "ramp")


@pytest.mark.parametrize("lateral", [True, False])
def test_sampler_mirrors_left_right_only_when_allowed(lateral):
    cfg = FinetuneConfig(task="seg3d", flip_prob=1.0, patch_3d=(4, 16, 16))
    sampler = SegPatchSampler([_ramp_case()], (4, 16, 16), cfg, np.random.default_rng(0),
                              flip_axes(3, lateral))
    x, _ = sampler.sample(4)
    columns = x[:, 0, 0, 0, :]  # (B, W)
    increasing = bool((columns[:, 1:] > columns[:, :-1]).all())
    assert increasing == lateral  # flip_prob 1: mirrored in every patch unless lateral


@pytest.mark.slow
def test_lateral_kidneys_survive_flips(tmp_path):
    """Both kidneys learnt with flips on (p 0.5), class names from the config.

    Measured after 500 steps at 1 thread, seeds 0 and 1: kidney_right / kidney_left Dice
    0.89 / 0.90 and 0.93 / 0.90 with the lateral rule; with ``lateral_labels: false``
    (left-right flips allowed) the same runs reach 0.51 / 0.00 and 0.60 / 0.08. The bound
    (0.75) sits between the two.
    """
    write_phantoms(tmp_path / "ct", 1, 0, labels=True, seed=2, fmt="nifti", lateral=True)
    cfg = FinetuneConfig(task="seg3d", model="micro", epochs=1, steps_per_epoch=500,
                         batch_size=2, lr=2e-3, warmup_steps=10, patch_3d=(8, 48, 48),
                         ct_spacing=(4.0, 6.0, 6.0), foreground_prob=0.5, flip_prob=0.5,
                         class_names=LATERAL_NAMES, sw_overlap=0.25, seed=0, threads=1)
    m = finetune(cfg, None, tmp_path / "ct", tmp_path / "ct", tmp_path / "run")
    kidneys = {k: m["dice_per_label"][k] for k in ("kidney_right", "kidney_left")}
    assert min(kidneys.values()) > 0.75, kidneys
