"""Fixtures of the data-layer tests: a small phantom site written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fed_unimiss.data.phantom import write_phantoms


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def phantom_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 CT cases (one DICOM series, one NIfTI) and 2 X-rays (DICOM, PNG), with labels."""
    out = tmp_path_factory.mktemp("phantom-site")
    write_phantoms(out, 2, 2, labels=True, seed=7)
    return out
