"""The one reader dispatch: a file's type -> its reader, and a scanned image -> a :class:`Sample`.

:func:`read_file` decodes one file by its type (the rule the scan uses: NIfTI and MetaImage CT
volumes, PNG/JPEG radiographs, anything else DICOM); :func:`read_sample` turns a scanned
:class:`UsableImage` (which may be a whole DICOM CT series) into a :class:`Sample` and its patient
key for the pretraining cache. Fine-tuning reads its task images with :func:`read_file` too.

``patient_key`` is the salted hash of the DICOM PatientID when there is one, otherwise of the
series (or file) identity - so images of one patient share a key and differential privacy can
sample by patient. It stays at the site (only in the site's cache index), like the salt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fed_unimiss.data.dicom_series import load_series, read_dataset
from fed_unimiss.data.nifti import read_metaimage, read_nifti
from fed_unimiss.data.sample import DataError, Sample, salted_hash
from fed_unimiss.data.scan import IMAGE_SUFFIXES, NIFTI_SUFFIXES, UsableImage
from fed_unimiss.data.xray import read_xray_dicom, read_xray_image

__all__ = ["read_sample", "read_file", "file_kind", "patient_key"]

Spacing = tuple[float, ...]

# image kind (as in UsableImage.kind) -> reader(path, min X-ray side) -> (array, spacing)
_READERS: dict[str, Callable[[Path, int], tuple[np.ndarray, Spacing | None]]] = {
    "nifti": lambda path, _: _volume(read_nifti(path)),
    "metaimage": lambda path, _: _volume(read_metaimage(path)),
    "dicom": lambda path, side: read_xray_dicom(read_dataset(path), side),
    "image": lambda path, side: read_xray_image(path, side),
}


def _volume(read: tuple[np.ndarray, object, Spacing]) -> tuple[np.ndarray, Spacing]:
    array, _, spacing = read
    return array, spacing


def file_kind(path: Path) -> str:
    """The kind of a single image file from its name, by the scan's rule."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".mhd"):
        return "metaimage"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    return "dicom"


def read_file(path: Path, min_xray_side: int = 64,
              default_xray_spacing: Spacing = (1.0, 1.0)) -> tuple[np.ndarray, Spacing]:
    """Decode one file: a CT volume in HU (D, H, W) or an X-ray (H, W) in [0, 1], and spacing
    (``default_xray_spacing`` for a radiograph whose file records none).

    Raises :class:`DataError` with a reason that does not name the file (the caller adds it).
    """
    array, spacing = _READERS[file_kind(path)](path, min_xray_side)
    return array, default_xray_spacing if spacing is None else spacing


def patient_key(image: UsableImage, salt: bytes) -> str:
    """Salted hash of PatientID, or of the series/file identity when PatientID is empty."""
    source = f"pid:{image.patient_id}" if image.patient_id.strip() else image.identity
    return salted_hash(salt, "patient", source)


def read_sample(image: UsableImage, salt: bytes, min_xray_side: int = 64,
                default_xray_spacing: Spacing = (1.0, 1.0)) -> tuple[Sample, str]:
    """Decode a scanned image into (Sample, patient_key); raises DataError with a reason.

    A radiograph whose file records no spacing gets ``default_xray_spacing``."""
    path = image.files[0]
    if image.kind == "dicom-series":
        if image.plan is None:
            raise DataError("DICOM series has no slice plan (scan it first)")
        array, spacing = load_series(image.plan), image.plan.spacing
    elif image.kind in _READERS:
        array, spacing = _READERS[image.kind](path, min_xray_side)
        spacing = default_xray_spacing if spacing is None else spacing
    else:
        raise DataError(f"unknown image kind {image.kind!r}")
    sample = Sample(array=array, spacing=tuple(float(s) for s in spacing),
                    modality=image.modality,  # type: ignore[arg-type]
                    sample_id=salted_hash(salt, "sample", image.identity))
    return sample, patient_key(image, salt)
