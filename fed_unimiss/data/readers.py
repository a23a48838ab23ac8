"""One entry point from a scanned :class:`UsableImage` to a :class:`Sample` and its patient key.

``patient_key`` is the salted hash of the DICOM PatientID when there is one, otherwise of the
series (or file) identity - so images of one patient share a key and differential privacy can
sample by patient. It stays at the site (only in the site's cache index), like the salt.
"""

from __future__ import annotations

from fed_unimiss.data.dicom_series import load_series, read_dataset
from fed_unimiss.data.nifti import read_metaimage, read_nifti
from fed_unimiss.data.sample import DataError, Sample, salted_hash
from fed_unimiss.data.scan import UsableImage
from fed_unimiss.data.xray import read_xray_dicom, read_xray_image

__all__ = ["read_sample", "patient_key"]


def patient_key(image: UsableImage, salt: bytes) -> str:
    """Salted hash of PatientID, or of the series/file identity when PatientID is empty."""
    source = f"pid:{image.patient_id}" if image.patient_id.strip() else image.identity
    return salted_hash(salt, "patient", source)


def read_sample(image: UsableImage, salt: bytes, min_xray_side: int = 64) -> tuple[Sample, str]:
    """Decode a scanned image into (Sample, patient_key); raises DataError with a reason."""
    path = image.files[0]
    if image.kind == "dicom-series":
        if image.plan is None:
            raise DataError("DICOM series has no slice plan (scan it first)")
        array, spacing = load_series(image.plan), image.plan.spacing
    elif image.kind == "nifti":
        array, _, spacing = read_nifti(path)
    elif image.kind == "metaimage":
        array, _, spacing = read_metaimage(path)
    elif image.kind == "dicom":
        array, spacing = read_xray_dicom(read_dataset(path), min_xray_side)
    elif image.kind == "image":
        array, spacing = read_xray_image(path, min_xray_side)
    else:
        raise DataError(f"unknown image kind {image.kind!r}")
    sample = Sample(array=array, spacing=tuple(float(s) for s in spacing),
                    modality=image.modality,  # type: ignore[arg-type]
                    sample_id=salted_hash(salt, "sample", image.identity))
    return sample, patient_key(image, salt)
