"""Procedural, labelled phantoms: the demo's and the tests' built-in CT and X-ray data.

CT phantoms are torso-like volumes in Hounsfield units: a body ellipse of soft tissue (40 HU)
with a fat rim (-100) in air (-1000), lungs (-800) in the upper half, liver (60) and kidneys (30)
in the lower half, a spine and ribs (700), Gaussian noise (sd 12 HU) and random shape variation
per case. Each case is written as a real DICOM CT series (CT Image Storage, one file per slice,
position/orientation/spacing, RescaleSlope/Intercept) or as a NIfTI volume with its affine.
X-rays are chest films drawn in 2D from projected densities, with every anatomical and acquisition
parameter random per seed (body, lungs, heart, ribs, clavicles, diaphragm, lesions, exposure,
gamma, noise, collimation, marker), written as DICOM CR/DX (MONOCHROME1 or MONOCHROME2,
BitsStored 10-16) or as 8-bit PNG.

Output layout (``fmt="alternate"`` writes each case once, alternating readers)::

    OUT/ct/case-0000/IM-0000.dcm ...    DICOM series (even cases)
    OUT/nifti/case-0001.nii.gz          NIfTI (odd cases)
    OUT/xray/xray-0000.dcm              DICOM radiographs (even), xray-0001.png (odd)
    OUT/labels/.fed-unimiss-ignore      (so `data check` skips the label folder)
    OUT/labels/labels.csv               file,label  (file relative to OUT; 1 = lesion present)
    OUT/labels/seg/case-0000.nii.gz     organ label map aligned with the CT (with --labels)

Label classes: 0 background/other tissue, 1 lung, 2 liver, 3 kidney, 4 bone, 5 lesion.
A lesion (hyperdense liver lesion or lung nodule) is drawn with probability 0.5; the binary
classification label says whether it is present. Everything derives from the seed - pixel noise,
shapes, UIDs - and dates are fixed, so the same seed writes the same bytes.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fed_unimiss.checkpoint import atomic_write_bytes
from fed_unimiss.data.scan import IGNORE_MARKER

__all__ = ["LABEL_CLASSES", "LATERAL_LABEL_CLASSES", "PhantomSet", "make_ct_phantom", "make_xray_phantom",
           "write_phantoms"]

LABEL_CLASSES = {0: "background", 1: "lung", 2: "liver", 3: "kidney", 4: "bone", 5: "lesion"}
# With ``lateral=True`` the kidneys are told apart by side, as real abdominal label sets do: the
# phantom is mirror-symmetric but for the liver, so only the position says which kidney is
# which, and a left-right flip of a training patch swaps their labels.
LATERAL_LABEL_CLASSES = {0: "background", 1: "lung", 2: "liver", 3: "kidney_right", 4: "bone",
                         5: "lesion", 6: "kidney_left"}
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"
Format = Literal["alternate", "dicom", "nifti", "both"]


@dataclass
class PhantomSet:
    """What :func:`write_phantoms` wrote (paths relative to the output folder)."""

    ct: list[str] = field(default_factory=list)
    xray: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)


def _ellipsoid(z, y, x, centre, radii) -> np.ndarray:
    return (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2) <= 1.0


def _body(rng: np.random.Generator, shape, spacing, z_extent: tuple[float, float]):
    """HU volume and label map (z, y, x) of a torso; z in mm from z_extent (inferior first)."""
    d, h, w = shape
    z = np.linspace(*z_extent, d)[:, None, None]
    y = ((np.arange(h) - (h - 1) / 2) * spacing[1])[None, :, None]
    x = ((np.arange(w) - (w - 1) / 2) * spacing[2])[None, None, :]
    a = rng.uniform(0.36, 0.42) * w * spacing[2] * (1 + 0.05 * np.sin(z / 60 + rng.uniform(0, 6)))
    b = rng.uniform(0.24, 0.30) * h * spacing[1] * np.ones_like(z)
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    r2 = (x / a) ** 2 + (y / b) ** 2
    hu[r2 <= 1] = -100.0  # fat rim
    inner = r2 <= (1 - 12 / b) ** 2
    hu[inner] = 40.0
    top = z_extent[1]
    chest = z > top - 0.55 * (top - z_extent[0])
    for side in (-1, 1):
        lung = _ellipsoid(z, y, x, (top - 0.3 * (top - z_extent[0]), -0.1 * b,
                                    side * 0.48 * a), (0.3 * (top - z_extent[0]), 0.6 * b,
                                                       rng.uniform(0.28, 0.34) * a)) & inner
        hu[lung], labels[lung] = -800.0, 1
        kidney = _ellipsoid(z, y, x, (z_extent[0] + 0.2 * (top - z_extent[0]), 0.45 * b,
                                      side * 0.38 * a), (30, 0.22 * b, 0.14 * a)) & ~chest
        hu[kidney], labels[kidney] = 30.0, 3
    liver = _ellipsoid(z, y, x, (z_extent[0] + 0.35 * (top - z_extent[0]), -0.05 * b, -0.4 * a),
                       (rng.uniform(0.2, 0.28) * (top - z_extent[0]), 0.6 * b, 0.42 * a)) & inner
    liver &= labels == 0
    hu[liver], labels[liver] = 60.0, 2
    spine = ((y - 0.62 * b) ** 2 + x ** 2) <= rng.uniform(12, 16) ** 2
    spine = np.broadcast_to(spine, shape)
    hu[spine], labels[spine] = 700.0, 4
    rib_period = rng.uniform(22, 28)
    ribs = (np.abs(r2 - 0.8) < 0.06) & chest & ((z % rib_period) < 8) & (y < 0.5 * b)
    hu[ribs], labels[ribs] = 650.0, 4
    return hu, labels, (z, y, x, a, b)


def _add_lesion(rng, hu, labels, grid, in_lung: bool) -> None:
    z, y, x, a, b = grid
    organ = 1 if in_lung else 2
    candidates = np.argwhere(labels == organ)
    if len(candidates) == 0:
        return
    cz, cy, cx = candidates[rng.integers(len(candidates))]
    radius = rng.uniform(9, 15)
    ball = _ellipsoid(z, y, x, (z[cz, 0, 0], y[0, cy, 0], x[0, 0, cx]), (radius,) * 3)
    ball &= labels == organ
    hu[ball], labels[ball] = (30.0 if in_lung else 130.0), 5


def make_ct_phantom(rng: np.random.Generator, lesion: bool):
    """Return (HU volume (D, 128, 128) float32, label map uint8, spacing (z, y, x) mm)."""
    depth = int(rng.integers(40, 49))
    spacing = (float(rng.choice([2.5, 3.0])), *(2 * [float(np.round(rng.uniform(1.6, 2.0), 3))]))
    hu, labels, grid = _body(rng, (depth, 128, 128), spacing, (0.0, depth * spacing[0]))
    if lesion:
        _add_lesion(rng, hu, labels, grid, in_lung=bool(rng.integers(2)))
    hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.float32), labels, spacing


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std random field of ``cells`` x ``cells`` knots upsampled to (size, size).

    Gives every film its own lung texture and soft-tissue unevenness (what makes two phantoms
    differ in the fine detail a self-supervised view can latch onto)."""
    knots = torch.from_numpy(rng.normal(0.0, 1.0, (1, 1, cells, cells)).astype(np.float32))
    field_ = F.interpolate(knots, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    field_ = field_.numpy()
    return (field_ - field_.mean()) / max(float(field_.std()), 1e-6)


def _rotated_grid(size: int, centre: tuple[float, float], angle: float):
    """(u, v) coordinates in [-1, 1] (v down), rotated by ``angle`` radians about ``centre``."""
    t = (np.arange(size) + 0.5) / size * 2 - 1
    v, u = np.meshgrid(t, t, indexing="ij")
    u, v = u - centre[0], v - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    return c * u + s * v, -s * u + c * v


def _ellipse_depth(u, v, cu, cv, ru, rv) -> np.ndarray:
    """Chord length (0..1) through an ellipsoid seen face-on: thick centre, thin rim."""
    r2 = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


def _xray_anatomy(rng: np.random.Generator, u: np.ndarray, v: np.ndarray):
    """Projected density (thickness-weighted attenuation) of one randomly shaped chest."""
    body_w, body_h = rng.uniform(0.55, 0.92), rng.uniform(0.85, 1.25)
    density = 0.9 * _ellipse_depth(u, v, 0.0, 0.25, body_w, body_h)  # soft tissue
    # Diaphragm: below a dome line (per side its own height) the abdomen is dense, lungs end.
    dia = rng.uniform(0.05, 0.45)
    dome = dia + rng.uniform(0.08, 0.2) * (np.abs(u) / body_w) ** 2 \
        + np.where(u > 0, rng.uniform(-0.06, 0.1), 0.0)
    abdomen = (v > dome) & (density > 0)
    density = density + 0.35 * abdomen * density
    # Lungs: two ellipses, each its own size/shape/position (asymmetry), air lowers the density.
    lung_top = rng.uniform(-0.85, -0.55)
    lungs = np.zeros_like(u)
    for side in (-1.0, 1.0):
        ru = body_w * rng.uniform(0.28, 0.42)
        cu = side * body_w * rng.uniform(0.38, 0.55)
        cv = rng.uniform(-0.3, 0.0)
        rv = max((dia + 0.15 - lung_top) / 2, 0.2) * rng.uniform(0.9, 1.15)
        lungs = np.maximum(lungs, _ellipse_depth(u, v, cu, (lung_top + dia) / 2 + cv * 0.3,
                                                 ru, rv) * (v < dome))
    texture = _smooth_field(rng, u.shape[0], int(rng.integers(8, 24)))
    lungs = lungs * (1.0 + rng.uniform(0.05, 0.2) * texture)
    density = density - rng.uniform(0.45, 0.75) * lungs
    # Mediastinum + spine (a vertical band) and the heart (an ellipse left of centre).
    spine_w = rng.uniform(0.06, 0.12)
    density = density + 0.5 * np.exp(-(u / spine_w) ** 4) * (density > 0)
    heart_r = rng.uniform(0.18, 0.32)
    heart = _ellipse_depth(u, v, rng.uniform(0.0, 0.18), dia - rng.uniform(0.1, 0.25),
                           heart_r * rng.uniform(1.0, 1.4), heart_r)
    density = density + rng.uniform(0.3, 0.6) * heart
    # Ribs: arcs y = y0 + k * u^2 + tilt * |u| on each side, count/spacing/angle per film.
    n_ribs = int(rng.integers(6, 13))
    spacing = rng.uniform(0.09, 0.16)
    curve, tilt = rng.uniform(0.2, 0.6), rng.uniform(-0.1, 0.3)
    width = rng.uniform(0.015, 0.035)
    ribs = np.zeros_like(u)
    for k in range(n_ribs):
        y0 = lung_top + 0.05 + k * spacing
        arc = v - (y0 + curve * u ** 2 + tilt * np.abs(u))
        ribs = np.maximum(ribs, np.exp(-(arc / width) ** 2))
    ribs *= (np.abs(u) > spine_w) & (np.abs(u) < body_w * 0.95) & (v < dome + 0.1)
    density = density + rng.uniform(0.15, 0.35) * ribs
    # Clavicles: two tilted bars near the top.
    clav_v, clav_tilt = lung_top + rng.uniform(-0.05, 0.1), rng.uniform(-0.25, 0.05)
    clav = np.exp(-((v - clav_v - clav_tilt * np.abs(u)) / rng.uniform(0.02, 0.04)) ** 2)
    clav *= (np.abs(u) > 0.05) & (np.abs(u) < body_w * rng.uniform(0.6, 0.85))
    density = density + rng.uniform(0.3, 0.5) * clav
    density = density * rng.uniform(0.9, 1.1) + 0.08 * _smooth_field(rng, u.shape[0], 6) * (
        density > 0)
    return np.clip(density, 0.0, None), lungs


def _add_xray_lesions(rng: np.random.Generator, density, lungs, u, v, count: int) -> None:
    """``count`` round opacities of random size, preferably inside the lungs."""
    candidates = np.argwhere(lungs > 0.3)
    if len(candidates) == 0:
        candidates = np.argwhere(density > 0)
    for _ in range(count):
        i, j = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(0.03, 0.12)
        density += rng.uniform(0.25, 0.6) * _ellipse_depth(u, v, u[i, j], v[i, j], radius,
                                                           radius * rng.uniform(0.8, 1.25))


def _expose(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Density -> film brightness with per-film exposure, contrast and gamma."""
    exposure = rng.uniform(1.2, 3.0)
    image = 1.0 - np.exp(-exposure * np.clip(density, 0.0, None))  # bright = dense
    image = image / max(float(image.max()), 1e-6)
    image = image ** rng.uniform(0.6, 1.6)
    lo, hi = rng.uniform(0.0, 0.15), rng.uniform(0.8, 1.0)
    return lo + (hi - lo) * image


def _collimate_and_mark(rng: np.random.Generator, image: np.ndarray) -> None:
    """Collimation borders (each side its own width) and a bright side marker, in place."""
    size = image.shape[0]
    level = rng.uniform(0.0, 0.1) if rng.random() < 0.7 else rng.uniform(0.85, 1.0)
    top, bottom, left, right = (int(rng.integers(0, size // 8)) for _ in range(4))
    image[:top], image[size - bottom:] = level, level
    image[:, :left], image[:, size - right:] = level, level
    if rng.random() < 0.8:
        side = max(size // 20, 3)
        y, x = (int(rng.integers(size // 16, size - size // 16 - side)) for _ in range(2))
        image[y:y + side, x:x + side // 3] = 0.98  # an "L" block: vertical then horizontal bar
        image[y + side - side // 3:y + side, x:x + side] = 0.98


def make_xray_phantom(rng: np.random.Generator, lesion: bool, size: int = 256) -> np.ndarray:
    """A chest film (size, size) in [0, 1], bright = dense, superior at the top.

    Drawn directly in 2D so that every seed gives a visibly different film: body size, position
    and rotation; lung size, shape and left/right asymmetry with their own texture; heart size
    and position; rib count, spacing and angle; clavicles; diaphragm height; 1-3 lesions of random
    size and position when ``lesion``; exposure, contrast, gamma, noise level; collimation borders
    and a side marker. (Near-identical films gave self-distillation nothing to tell apart:
    docs/pretraining.md.)"""
    centre = (rng.uniform(-0.12, 0.12), rng.uniform(-0.1, 0.1))
    u, v = _rotated_grid(size, centre, np.deg2rad(rng.uniform(-12.0, 12.0)))
    density, lungs = _xray_anatomy(rng, u, v)
    if lesion:
        _add_xray_lesions(rng, density, lungs, u, v, int(rng.integers(1, 4)))
    image = _expose(rng, density)
    image = image + rng.normal(0.0, rng.uniform(0.005, 0.04), image.shape)
    _collimate_and_mark(rng, image)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _uid(seed: int, *parts: object) -> str:
    # pydicom derives the UID from the entropy sources only with a prefix (its own root).
    return generate_uid(entropy_srcs=["fed-unimiss-phantom", str(seed),
                                                   *map(str, parts)])


def _base_dataset(sop_class: str, sop_uid: str, patient: str, modality: str) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientID, ds.PatientName = patient, f"Phantom^{patient[-4:]}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.Modality, ds.Manufacturer = modality, "fed-unimiss phantom"
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.BitsAllocated = 1, 0, 16
    return ds


def _dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _write_ct_dicom(folder: Path, hu: np.ndarray, spacing, seed: int, case: int) -> None:
    study, series, frame = (_uid(seed, case, k) for k in ("study", "series", "frame"))
    origin = (-(hu.shape[2] - 1) / 2 * spacing[2], -(hu.shape[1] - 1) / 2 * spacing[1], 0.0)
    stored = np.round(hu + 1024).astype(np.uint16)
    for k in range(hu.shape[0]):
        ds = _base_dataset(CT_SOP, _uid(seed, case, "slice", k), f"PHANTOM-{case:04d}", "CT")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [f"{origin[0]:.3f}", f"{origin[1]:.3f}", f"{k * spacing[0]:.3f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[2]:g}"]
        ds.SliceThickness = f"{spacing[0]:g}"
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.minimum(stored[k], 4095).tobytes()
        atomic_write_bytes(folder / f"IM-{k:04d}.dcm", _dicom_bytes(ds))


def _nifti_bytes(volume: np.ndarray, spacing) -> bytes:
    """(z, y, x) array in the DICOM layout (LPS axes) -> gzipped NIfTI with an RAS affine."""
    d, h, w = volume.shape
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    affine[:3, 3] = [(w - 1) / 2 * spacing[2], (h - 1) / 2 * spacing[1], 0.0]
    image = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), affine)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), mtime=0)


def _write_xray(out: Path, image: np.ndarray, seed: int, index: int, as_dicom: bool) -> str:
    if not as_dicom:
        rel = f"xray/xray-{index:04d}.png"
        buffer = io.BytesIO()
        Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(buffer, "PNG")
        atomic_write_bytes(out / rel, buffer.getvalue())
        return rel
    bits = (10, 12, 14, 16)[index // 2 % 4]
    mono1 = index // 2 % 2 == 1
    sop = CR_SOP if mono1 else DX_SOP
    ds = _base_dataset(sop, _uid(seed, "xray", index), f"PHANTOM-X{index:03d}",
                       "CR" if mono1 else "DX")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(seed, "xs", index), _uid(seed, "xr", index)
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = image.shape
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.ImagerPixelSpacing = ["1.4", "1.4"]
    top = 2 ** bits - 1
    ds.PixelData = np.round((1 - image if mono1 else image) * top).astype(np.uint16).tobytes()
    if index % 3 == 0:
        ds.WindowCenter, ds.WindowWidth = top // 2, top
    rel = f"xray/xray-{index:04d}.dcm"
    atomic_write_bytes(out / rel, _dicom_bytes(ds))
    return rel


def write_phantoms(out: str | Path, n_ct: int, n_xray: int, *, labels: bool = False,
                   seed: int = 0, fmt: Format = "alternate", lateral: bool = False,
                   lesions: bool = True) -> PhantomSet:
    """Write ``n_ct`` CT phantoms and ``n_xray`` radiographs under ``out`` (see module doc).

    ``fmt`` chooses CT formats: ``alternate`` (DICOM for even cases, NIfTI for odd: every reader
    is exercised and a scan counts each case once), ``dicom``, ``nifti`` or ``both`` (each case
    twice - a scan of ``out`` then counts it twice). X-rays always alternate DICOM and PNG.
    ``lateral`` labels the kidneys by side (:data:`LATERAL_LABEL_CLASSES`); the images are the
    same bytes either way. ``lesions=False`` draws no CT lesion (an organs-only label set: a
    lesion is a few hundred voxels in half the volumes, too rare a class for a small probe).
    """
    out = Path(out)
    result = PhantomSet()
    for case in range(n_ct):
        rng = np.random.default_rng([seed, 1, case])
        lesion = bool(rng.integers(2)) and lesions
        hu, seg, spacing = make_ct_phantom(rng, lesion)
        if lateral:
            seg = split_kidneys_by_side(seg)
        as_dicom = fmt in ("dicom", "both") or (fmt == "alternate" and case % 2 == 0)
        as_nifti = fmt in ("nifti", "both") or (fmt == "alternate" and case % 2 == 1)
        if as_dicom:
            _write_ct_dicom(out / "ct" / f"case-{case:04d}", hu, spacing, seed, case)
            result.ct.append(f"ct/case-{case:04d}")
        if as_nifti:
            atomic_write_bytes(out / "nifti" / f"case-{case:04d}.nii.gz", _nifti_bytes(hu, spacing))
            result.ct.append(f"nifti/case-{case:04d}.nii.gz")
        if labels:
            atomic_write_bytes(out / "labels" / "seg" / f"case-{case:04d}.nii.gz",
                               _nifti_bytes(seg, spacing))
        for rel in result.ct[-(as_dicom + as_nifti):]:
            result.labels[rel] = int(lesion)
    for index in range(n_xray):
        rng = np.random.default_rng([seed, 2, index])
        lesion = bool(rng.integers(2))
        rel = _write_xray(out, make_xray_phantom(rng, lesion), seed, index, index % 2 == 0)
        result.xray.append(rel)
        result.labels[rel] = int(lesion)
    if labels:
        _write_labels(out / "labels", result.labels)
    return result


def split_kidneys_by_side(seg: np.ndarray) -> np.ndarray:
    """Relabel the kidney on the left half of the body (x > 0, away from the liver) as class 6.

    The kidneys sit at +-0.38 of the body's half-width with a radius of 0.14 of it, so the
    midline never cuts one.
    """
    out = seg.copy()
    left = np.zeros(seg.shape, bool)
    left[..., seg.shape[-1] // 2:] = True
    out[(seg == 3) & left] = 6
    return out


def _write_labels(folder: Path, labels: dict[str, int]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "label"])
    writer.writerows(sorted(labels.items()))
    atomic_write_bytes(folder / "labels.csv", buffer.getvalue().encode())
    atomic_write_bytes(folder / IGNORE_MARKER, b"label files: not images for training\n")
