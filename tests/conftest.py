"""Shared test fixtures: the real CT/X-ray samples and the repository paths."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FETCH_SCRIPT = SHARED / "data" / "fetch-real-samples.sh"
SAMPLES_CACHE = Path(os.environ.get("FED_UNIMISS_SAMPLES", REPO / ".cache" / "real-samples"))


@pytest.fixture(scope="session")
def real_samples() -> Path:
    """The real CT samples (sinus DICOM series, head NIfTI, MetaImage), fetched once into a cache.

    Skips, with the reason, only where the fetch script or apt (or root for it) is missing. Where
    they are present, a failed fetch is a test failure, never a silent skip.
    """
    if (SAMPLES_CACHE / ".complete").exists():
        return SAMPLES_CACHE
    if not FETCH_SCRIPT.exists():
        pytest.skip(f"real samples unavailable: {FETCH_SCRIPT} does not exist")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("real samples unavailable: apt-get/dpkg-deb not on this machine")
    if os.geteuid() != 0:
        pytest.skip("real samples unavailable: fetch-real-samples.sh needs root for apt")
    proc = subprocess.run(
        ["bash", str(FETCH_SCRIPT), str(SAMPLES_CACHE)], capture_output=True, text=True,
        timeout=600,
    )
    if proc.returncode != 0 or not (SAMPLES_CACHE / ".complete").exists():
        pytest.fail(f"fetch-real-samples.sh failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return SAMPLES_CACHE


@pytest.fixture(scope="session")
def real_xray() -> Path:
    """The real chest radiograph RG1_UNCR.dcm (CR, MONOCHROME1) from the pydicom-data package."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.fail("pydicom-data does not provide RG1_UNCR.dcm (is pydicom-data installed?)")
    return Path(path)
