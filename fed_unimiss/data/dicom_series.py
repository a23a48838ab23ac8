"""DICOM files -> CT volumes: header inspection, series assembly and Hounsfield decoding.

All parsing is pydicom's: :func:`pydicom.dcmread` for headers, ``Dataset.pixel_array`` for
pixels and :func:`pydicom.pixels.apply_modality_lut` for RescaleSlope/Intercept (or a Modality
LUT). This module adds only what DICOM leaves to the reader: which files form one volume, in
which order, and whether that volume is complete.

Slices are grouped by SeriesInstanceUID and ordered by their position along the slice normal
(``ImagePositionPatient`` projected on ``row x column`` of ``ImageOrientationPatient``), never by
InstanceNumber or file name. The slice step is measured from those positions, not read from
SliceThickness (which is the reconstruction thickness, not the spacing).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.utils import get_expected_length

from fed_unimiss.data.sample import DataError

__all__ = ["DicomHeader", "SeriesPlan", "inspect_dicom", "read_dataset", "plan_series",
           "load_series"]

logger = logging.getLogger(__name__)

CT_MODALITIES = {"CT"}
XRAY_MODALITIES = {"CR", "DX", "RG", "DR"}
CT_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage
# CR, DX for presentation / for processing.
XRAY_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                    "1.2.840.10008.5.1.4.1.1.1.1.1"}


@dataclass(frozen=True)
class DicomHeader:
    """What the reader needs from one DICOM file. Site-local: holds a path and identifiers."""

    path: Path
    kind: str  # "ct" or "xray"
    series_uid: str
    patient_id: str
    rows: int
    columns: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    series_number: str


@dataclass(frozen=True)
class SeriesPlan:
    """A complete, ordered CT series: files sorted along the normal and the voxel spacing."""

    files: tuple[Path, ...]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (slice step, row spacing, column spacing) in mm
    series_uid: str
    patient_id: str
    series_number: str


def read_dataset(path: Path, *, pixels: bool = True) -> pydicom.Dataset:
    """``dcmread`` with every failure turned into a :class:`DataError` with a human reason."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        force = len(head) < 132 or head[128:132] != b"DICM"
        ds = pydicom.dcmread(path, force=force, stop_before_pixels=not pixels)
    except InvalidDicomError as e:
        raise DataError(f"not a DICOM file ({e})") from e
    except (EOFError, OSError) as e:
        raise DataError(f"cannot read DICOM file: {getattr(e, 'strerror', None) or e}") from e
    except Exception as e:  # pydicom raises many types for damaged files
        raise DataError(f"damaged DICOM file ({type(e).__name__}: {e})") from e
    if "SOPClassUID" not in ds and "Modality" not in ds and "PixelData" not in ds:
        raise DataError("not a DICOM file (no DICOM image elements found)")
    return ds


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise DataError(f"{keyword} is not numeric ({e})") from e
    if len(values) != n or not all(np.isfinite(values)):
        raise DataError(f"{keyword} must hold {n} finite numbers, got {len(values)}")
    return values


def _kind(ds: pydicom.Dataset) -> str:
    modality = str(ds.get("Modality", "")).upper()
    sop = str(ds.get("SOPClassUID", ""))
    if modality in CT_MODALITIES or sop in CT_SOP_CLASSES:
        return "ct"
    if modality in XRAY_MODALITIES or sop in XRAY_SOP_CLASSES:
        return "xray"
    name = modality or "unknown"
    raise DataError(f"modality {name} is not supported (only CT series and CR/DX radiographs)")


def _check_pixel_data(ds: pydicom.Dataset) -> None:
    if "PixelData" not in ds:
        raise DataError("DICOM file has no pixel data (e.g. a DICOMDIR, report or presentation "
                        "state)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DataError(f"colour image (SamplesPerPixel={ds.SamplesPerPixel}); only greyscale "
                        "CT and radiographs are supported")
    if ds.file_meta.get("TransferSyntaxUID") is not None and \
            not ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            expected = get_expected_length(ds, "bytes")
        except Exception as e:
            raise DataError(f"incomplete image header ({e})") from e
        actual = len(ds.PixelData)
        if actual < expected:
            raise DataError(f"truncated pixel data: {actual} of {expected} bytes present")


def inspect_dicom(path: Path) -> DicomHeader:
    """Read one file's header (and check its pixel data is complete) without decoding pixels."""
    ds = read_dataset(path)
    kind = _kind(ds)
    _check_pixel_data(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"multi-frame DICOM ({frames} frames) is not supported; export the "
                        "series as single-frame slices")
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows < 1 or columns < 1:
        raise DataError(f"invalid image size {rows} x {columns}")
    position = orientation = None
    if kind == "ct":
        position = _floats(ds, "ImagePositionPatient", 3)
        orientation = _floats(ds, "ImageOrientationPatient", 6)
        if position is None or orientation is None:
            raise DataError("CT slice lacks ImagePositionPatient/ImageOrientationPatient, so it "
                            "cannot be placed in a volume")
    spacing = _floats(ds, "PixelSpacing", 2) or _floats(ds, "ImagerPixelSpacing", 2)
    return DicomHeader(
        path=path, kind=kind, series_uid=str(ds.get("SeriesInstanceUID", "")) or f"file:{path}",
        patient_id=str(ds.get("PatientID", "") or ""), rows=rows, columns=columns,
        position=position, orientation=orientation, pixel_spacing=spacing,
        series_number=str(ds.get("SeriesNumber", "") or ""),
    )


def _slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-3:
        raise DataError("ImageOrientationPatient row and column directions are parallel")
    return normal / norm


def _check_steps(positions: np.ndarray, tolerance: float) -> float:
    """Return the slice step; raise with a reason for duplicates, gaps or uneven spacing."""
    steps = np.diff(positions)
    step = float(np.median(steps))
    if step <= 1e-4:
        raise DataError("slices share the same position (duplicates or a multi-phase series)")
    duplicates = int(np.sum(steps < 1e-3 * step + 1e-4))
    if duplicates:
        raise DataError(f"{duplicates} slice(s) share a position with another slice")
    ratio = steps / step
    for i, r in enumerate(ratio):
        k = round(r)
        if k >= 2 and abs(r - k) <= tolerance * k:
            missing = int(np.sum(np.round(ratio[ratio > 1 + tolerance]) - 1))
            raise DataError(
                f"{missing} slice(s) missing: gap of {steps[i]:.2f} mm after slice {i + 1} "
                f"where the step is {step:.2f} mm"
            )
    bad = np.abs(ratio - 1) > tolerance
    if bad.any():
        raise DataError(
            f"unevenly spaced slices: steps range {steps.min():.3f}-{steps.max():.3f} mm "
            f"around a median of {step:.3f} mm (tolerance {tolerance:.0%})"
        )
    return step


def plan_series(headers: list[DicomHeader], min_slices: int = 8,
                tolerance: float = 0.1) -> SeriesPlan:
    """Order one series' slices along the normal and check it is a complete, regular volume."""
    if not headers:
        raise DataError("empty series")
    if len(headers) < min_slices:
        what = "a single 2D slice" if len(headers) == 1 else f"only {len(headers)} slices"
        raise DataError(f"{what} where a volume is expected (a CT series needs at least "
                        f"{min_slices} slices)")
    sizes = Counter((h.rows, h.columns) for h in headers)
    if len(sizes) > 1:
        listing = ", ".join(f"{r}x{c} ({n} files)" for (r, c), n in sizes.most_common())
        raise DataError(f"slices of different sizes in one series: {listing}")
    orientation = np.asarray(headers[0].orientation)
    if any(np.abs(np.asarray(h.orientation) - orientation).max() > 1e-3 for h in headers):
        raise DataError("slices have different orientations (ImageOrientationPatient)")
    spacings = {h.pixel_spacing for h in headers}
    if None in spacings:
        raise DataError("CT slices lack PixelSpacing")
    if len(spacings) > 1:
        raise DataError(f"slices have different PixelSpacing: {sorted(spacings)}")
    (row_sp, col_sp), = spacings
    if row_sp <= 0 or col_sp <= 0:
        raise DataError(f"PixelSpacing must be positive, got {row_sp}, {col_sp}")
    normal = _slice_normal(headers[0].orientation)
    distance = np.array([np.dot(h.position, normal) for h in headers])
    order = np.argsort(distance, kind="stable")
    step = _check_steps(distance[order], tolerance)
    ordered = [headers[i] for i in order]
    return SeriesPlan(
        files=tuple(h.path for h in ordered),
        shape=(len(ordered), headers[0].rows, headers[0].columns),
        spacing=(step, row_sp, col_sp),
        series_uid=headers[0].series_uid,
        patient_id=next((h.patient_id for h in headers if h.patient_id), ""),
        series_number=headers[0].series_number,
    )


def load_series(plan: SeriesPlan) -> np.ndarray:
    """Decode the planned slices into a float32 (D, H, W) volume in Hounsfield units."""
    volume = np.empty(plan.shape, dtype=np.float32)
    for i, path in enumerate(plan.files):
        ds = read_dataset(path)
        try:
            pixels = apply_modality_lut(ds.pixel_array, ds)
        except Exception as e:
            raise DataError(f"{path.name}: cannot decode pixel data ({type(e).__name__}: {e})") \
                from e
        if pixels.shape != plan.shape[1:]:
            raise DataError(f"{path.name}: decoded size {pixels.shape} differs from the series "
                            f"{plan.shape[1:]}")
        volume[i] = pixels
    if not np.isfinite(volume).all():
        raise DataError("volume contains non-finite values after rescaling")
    return volume
