"""Site cache: arrays and index, incremental rebuilds, datasets that survive corrupt entries."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fed_unimiss.data.cache import SiteIndex, build_cache
from fed_unimiss.data.config import DataConfig
from fed_unimiss.data.datasets import CTTileDataset, XrayDataset
from fed_unimiss.data.preprocess import resample_volume, tile_volume

CFG = DataConfig(ct_spacing=(6.0, 4.0, 4.0), ct_tile_depth=8, ct_tile_stride=8, xray_size=64)


@pytest.fixture()
def site(tmp_path, phantom_site) -> Path:
    root = tmp_path / "images"
    shutil.copytree(phantom_site, root, symlinks=True)
    return root


def test_cache_contents_and_privacy_of_the_summary(site, tmp_path):
    index = build_cache(site, tmp_path / "work", CFG)
    assert index.built == 4 and index.reused == 0 and index.rejected == []
    assert index.summary()["ct_volumes"] == 2 and index.summary()["xrays"] == 2
    for entry in index.ct_tiles:
        tile = np.load(entry.path, mmap_mode="r")
        assert tile.dtype == np.float32 and tile.shape == entry.shape and tile.shape[0] == 8
        assert -1.1 < tile.min() and tile.max() < 1.0  # HU / 1024: air -1, bone 0.68
    for entry in index.xrays:
        assert np.load(entry.path, mmap_mode="r").shape == (64, 64)
    summary = json.dumps(index.summary())
    assert all(isinstance(v, int) for v in index.summary().values())
    assert "PHANTOM" not in summary and str(site) not in summary
    # sample ids and patient keys are salted hashes, not the synthetic PatientID or a path
    keys = {e.patient_key for e in index.ct_tiles + index.xrays}
    assert len(keys) == 4 and not any("PHANTOM" in k or "/" in k for k in keys)
    assert SiteIndex.load(tmp_path / "work").summary() == index.summary()


def test_changed_file_or_setting_rebuilds_only_what_changed(site, tmp_path):
    work = tmp_path / "work"
    first = build_cache(site, work, CFG)
    again = build_cache(site, work, CFG)
    assert (again.built, again.reused) == (0, 4)
    old_ct = {e.path for e in first.ct_tiles}

    png = site / "xray" / "xray-0001.png"
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))
    touched = build_cache(site, work, CFG)
    assert (touched.built, touched.reused) == (1, 3)

    resized = build_cache(site, work, DataConfig(**{**CFG.__dict__, "xray_size": 32}))
    assert (resized.built, resized.reused) == (2, 2)
    assert {e.path for e in resized.ct_tiles} == old_ct
    assert all(np.load(e.path).shape == (32, 32) for e in resized.xrays)
    # arrays of the old X-ray size were removed, not left to fill the disk
    assert len(list((work / "cache" / "xray").glob("*.npy"))) == 2


def test_datasets_return_tensors_and_skip_corrupt_entries(site, tmp_path):
    index = build_cache(site, tmp_path / "work", CFG)
    ct, xr = CTTileDataset(index), XrayDataset(index)
    item = ct[0]
    assert item.dtype == torch.float32 and item.shape == (1, *index.ct_tiles[0].shape)
    assert xr[0].shape == (1, 64, 64) and 0 <= xr[0].min() and xr[0].max() <= 1
    assert ct.groups() == [e.patient_key for e in index.ct_tiles]

    index.xrays[0].path.write_bytes(b"not an npy file")
    np.save(index.xrays[1].path, np.zeros((10, 10), np.float32))
    assert xr[0] is None and xr[1] is None and xr.skipped == 2


def test_dataset_order_is_the_same_for_a_copy_with_new_mtimes(site, tmp_path):
    """Same data, same order: a training run must not depend on where the data lives or when it
    was copied (the order used to follow a hash of path and mtime)."""
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(site, copy, symlinks=True)
    for f in sorted(p for p in copy.rglob("*") if p.is_file()):
        os.utime(f, ns=(1_000_000_000, 1_000_000_000 + hash(f.name) % 1_000_000))
    a = build_cache(site, tmp_path / "work-a", CFG)
    b = build_cache(copy, tmp_path / "work-b", CFG)
    xa, xb = XrayDataset(a), XrayDataset(b)
    ca, cb = CTTileDataset(a), CTTileDataset(b)
    assert len(xa) == len(xb) >= 2 and len(ca) == len(cb) >= 2
    assert all(torch.equal(xa[i], xb[i]) for i in range(len(xa)))
    assert all(torch.equal(ca[i], cb[i]) for i in range(len(ca)))
    for index, work in ((a, "work-a"), (b, "work-b")):  # a restarted site reads the same order
        reloaded = SiteIndex.load(tmp_path / work)
        assert [e.path for e in reloaded.ct_tiles] == [e.path for e in index.ct_tiles]
        assert [e.path for e in reloaded.xrays] == [e.path for e in index.xrays]
    again = build_cache(copy, tmp_path / "work-b", CFG)  # reused entries keep their place
    assert again.reused > 0 and [e.path for e in again.xrays] == [e.path for e in b.xrays]


def test_short_volume_is_padded_and_tiles_cover_every_slice():
    volume = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 2, 2), np.float32)
    (tile,) = tile_volume(volume, 8, 8)
    assert tile[:, 0, 0].tolist() == [0, 0, 0, 1, 2, 3, 4, 4, 4][:8] or \
        tile[:, 0, 0].tolist() == [0, 0, 1, 2, 3, 4, 4, 4]
    tiles = tile_volume(np.arange(20, dtype=np.float32)[:, None, None], 8, 8)
    assert [t[0, 0, 0] for t in tiles] == [0, 8, 12]  # last tile aligned to the end


def test_resampling_keeps_intensities_and_geometry():
    volume = np.full((30, 40, 40), 50.0, np.float32)
    out = resample_volume(volume, (1.0, 0.5, 0.5), (3.0, 1.0, 1.0))
    assert out.shape == (10, 20, 20)
    np.testing.assert_allclose(out, 50.0, rtol=1e-5)
