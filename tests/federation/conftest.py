"""Phantom sites for the federation tests, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def phantom_sites(tmp_path_factory) -> dict[str, Path]:
    """Three tiny sites: CT only, X-ray only, and both (real DICOM/NIfTI/PNG files)."""
    from fed_unimiss.data.phantom import write_phantoms

    root = tmp_path_factory.mktemp("phantom-sites")
    write_phantoms(root / "ct", n_ct=2, n_xray=0, seed=1)
    write_phantoms(root / "xr", n_ct=0, n_xray=4, seed=2)
    write_phantoms(root / "both", n_ct=1, n_xray=2, seed=3)
    return {name: root / name for name in ("ct", "xr", "both")}
