"""Fixtures of the privacy tests: one thread, small phantom sites written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fed_unimiss.data.phantom import write_phantoms


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def xray_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 phantom radiographs (DICOM and PNG alternating), each its own patient."""
    out = tmp_path_factory.mktemp("dp-xray-site")
    write_phantoms(out, 0, 6, seed=3)
    return out


@pytest.fixture(scope="session")
def xray_site_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp-xray-site-b")
    write_phantoms(out, 0, 4, seed=4)
    return out


@pytest.fixture(scope="session")
def phantom_both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 phantom CT volume and 2 radiographs, each its own patient: 3D and 2D DP steps."""
    out = tmp_path_factory.mktemp("dp-both-site")
    write_phantoms(out, 1, 2, seed=3)
    return out
