"""2D and 3D views: shapes, ranges, determinism from the (seed, step) generator, modes."""

from __future__ import annotations

import pytest
import torch

from fed_unimiss.ssl.config import SSLConfig
from fed_unimiss.ssl.views import ct_views, gaussian_blur2d, step_generator, xray_views

CFG = SSLConfig(crop_2d=40, view_depth=8, view_size=32)


def _xray():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    return (0.5 * yy + 0.5 * xx).unsqueeze(0)  # a ramp: crops and flips are visible


def _tile():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 24, 80, 90, generator=g) * 0.3


def test_xray_views_shape_range_and_determinism():
    a = xray_views(_xray(), step_generator(0, "views", 5, 0), CFG)
    b = xray_views(_xray(), step_generator(0, "views", 5, 0), CFG)
    c = xray_views(_xray(), step_generator(0, "views", 6, 0), CFG)
    assert len(a) == 2 and all(v.shape == (3, 40, 40) for v in a)
    assert all(0.0 <= float(v.min()) and float(v.max()) <= 1.0 for v in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not torch.equal(a[0], a[1])  # two different views of one image
    assert torch.equal(a[0][0], a[0][1]) and torch.equal(a[0][0], a[0][2])  # grey in 3 channels


def test_ct_views_shape_and_determinism():
    a = ct_views(_tile(), step_generator(1, "views", 0, 0), CFG)
    b = ct_views(_tile(), step_generator(1, "views", 0, 0), CFG)
    assert len(a) == 2 and all(v.shape == (1, 8, 32, 32) for v in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.isfinite(v).all() for v in a)
    assert not torch.equal(a[0], a[1])


def test_intensity_mode_slice_draws_per_slice(monkeypatch):
    """Only multiplicative brightness, always on: "slice" scales slices differently, "volume" not."""
    import fed_unimiss.ssl.views as views

    for name in ("NOISE_3D", "BLUR_3D", "CONTRAST_3D", "GAMMA_3D"):
        monkeypatch.setattr(views, name, (0.0, getattr(views, name)[1]))
    monkeypatch.setattr(views, "ADD_BRIGHT_3D", (0.0, 0.1))
    monkeypatch.setattr(views, "MUL_BRIGHT_3D", (1.0, (0.5, 1.5)))
    tile = torch.ones(1, 24, 64, 64)
    for mode, expect_equal in (("volume", True), ("slice", False)):
        cfg = SSLConfig(view_depth=8, view_size=32, intensity_mode=mode, flip_prob_3d=0.0)
        v = ct_views(tile, step_generator(0, mode), cfg)[0][0]  # (8, 32, 32)
        per_slice = v.mean(dim=(1, 2))
        assert torch.allclose(per_slice, per_slice[0].expand(8)) == expect_equal, mode
        assert not torch.allclose(per_slice, torch.ones(8))  # the brightness did change


def test_bad_shapes_are_rejected_with_the_shape():
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        xray_views(torch.zeros(3, 64, 64), step_generator(0), CFG)
    with pytest.raises(ValueError, match="fewer than view_depth"):
        ct_views(torch.zeros(1, 4, 64, 64), step_generator(0), CFG)


def test_gaussian_blur_preserves_a_constant_and_smooths_noise():
    x = torch.full((1, 20, 20), 0.7)
    torch.testing.assert_close(gaussian_blur2d(x, 1.5), x)
    noise = torch.randn(1, 40, 40, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur2d(noise, 1.5).std() < 0.5 * noise.std()
