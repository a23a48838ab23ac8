"""Readers against real scanner output: the sinus CT series, a head CT NIfTI, a chest CR."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from fed_unimiss.data.readers import read_sample
from fed_unimiss.data.scan import scan
from fed_unimiss.data.xray import read_xray_dicom

pytestmark = pytest.mark.realdata


def test_sinus_ct_series_is_one_complete_volume(real_samples):
    report = scan(real_samples / "sinus-ct-dicom")
    assert report.rejected == []
    (series,) = report.usable
    assert series.kind == "dicom-series"
    assert series.shape == (163, 512, 512)
    assert series.spacing[1:] == (0.3125, 0.3125)
    assert series.spacing[0] == pytest.approx(0.7, abs=0.01)
    sample, key = read_sample(series, b"s" * 32)
    assert sample.array.shape == (163, 512, 512) and sample.array.dtype == np.float32
    assert sample.array.min() == pytest.approx(-1024)  # RescaleIntercept applied: air in HU
    assert 1000 < sample.array.max() < 4000  # bone in HU
    # ordered along the normal: the file order on disk is not the slice order
    positions = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
                 for p in series.plan.files]
    assert positions == sorted(positions)
    assert series.identity not in sample.sample_id and key.startswith("pa-")


def test_head_ct_nifti_is_read_canonically(real_samples):
    report = scan(real_samples / "headct.nii.gz")
    (volume,) = report.usable
    assert volume.kind == "nifti"
    assert volume.shape == (225, 256, 208)  # RAS (x, y, z) = (208, 256, 225) -> (z, y, x)
    assert volume.spacing == (1.0, 1.0, 1.0)
    sample, _ = read_sample(volume, b"s" * 32)
    assert sample.array.shape == volume.shape and np.isfinite(sample.array).all()


def test_real_chest_radiograph_monochrome1_becomes_bone_white(real_xray):
    ds = pydicom.dcmread(real_xray)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image, _ = read_xray_dicom(ds)
    assert image.shape == (1955, 1841) and image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 1
    h, w = image.shape
    # The mediastinum/spine column is denser than the lung fields beside it: brighter after
    # the MONOCHROME1 inversion.
    centre = image[h // 3: 2 * h // 3, w // 2 - 60: w // 2 + 60].mean()
    lungs = image[h // 3: 2 * h // 3, w // 4 - 60: w // 4 + 60].mean()
    assert centre > lungs + 0.05
    report = scan(real_xray)
    assert [u.modality for u in report.usable] == ["xray"]
