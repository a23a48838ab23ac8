"""Fixtures of the SSL tests: a small phantom site (real DICOM/NIfTI/PNG files written by the data
layer, cached by build_cache) and a micro recipe small enough for 2 shared CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fed_unimiss.data.cache import build_cache
from fed_unimiss.data.config import DataConfig
from fed_unimiss.data.phantom import write_phantoms
from fed_unimiss.ssl.config import Recipe, recipe_from_dict
from fed_unimiss.ssl.site_data import SiteData

REPO = Path(__file__).resolve().parents[2]
MICRO_RECIPE = REPO / "configs" / "pretrain" / "micro.yaml"


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ssl-phantoms")
    write_phantoms(out, n_ct=2, n_xray=6, seed=3)
    return out


@pytest.fixture(scope="session")
def phantom_work(phantom_dir, tmp_path_factory) -> Path:
    """A built site cache (RUN/work layout) of the phantom folder."""
    work = tmp_path_factory.mktemp("ssl-work")
    build_cache([phantom_dir], work, DataConfig(xray_size=96))
    return work


@pytest.fixture()
def site_data(phantom_work) -> SiteData:
    from fed_unimiss.data.cache import SiteIndex

    return SiteData.from_index(SiteIndex.load(phantom_work))


def make_recipe(**ssl) -> Recipe:
    """The micro model with the smallest views it accepts and tiny batches."""
    base = {"batch_size_2d": 2, "batch_size_3d": 1, "steps_per_epoch": 2, "epochs": 4,
            "crop_2d": 48, "view_depth": 8, "view_size": 48, "warmup_epochs": 1,
            "lr": 0.05, "freeze_last_layer": 1, "log_every": 1}
    base.update(ssl)
    return recipe_from_dict({"model": {"preset": "micro", "head_out_dim": 256},
                             "data": {"xray_size": 96}, "ssl": base})


@pytest.fixture()
def recipe_factory():
    """``recipe_factory(**ssl_overrides) -> Recipe`` (see :func:`make_recipe`)."""
    return make_recipe
