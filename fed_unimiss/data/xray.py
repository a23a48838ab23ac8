"""Radiographs -> (H, W) float32 in [0, 1] with bright = dense (bone white).

DICOM CR/DX: ``pixel_array`` (any BitsStored), then :func:`pydicom.pixels.apply_modality_lut`
and, where the file carries a VOI LUT or window, :func:`pydicom.pixels.apply_voi_lut` - the
display mapping the modality chose. MONOCHROME1 (low value = white) is inverted so that dense
tissue is always bright. The result is scaled to [0, 1]: by its value range after a VOI mapping
(which already clips to the window), otherwise by the 0.5th-99.5th percentiles, clipped, so that
a few hot or dead detector pixels do not squash the contrast.

PNG/JPEG through Pillow: greyscale as stored (8 or 16 bit), colour converted to luminance; the
display convention of an exported picture is assumed (bone white). Their spacing is unknown:
the readers return None (``data check`` shows "unknown"), and training uses the configured
default (``DataConfig.xray_default_spacing``; the X-ray path resizes to ``xray_size`` anyway).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from fed_unimiss.data.sample import DataError

__all__ = ["read_xray_dicom", "read_xray_image", "UNKNOWN_SPACING"]

UNKNOWN_SPACING = None  # the file records no pixel spacing


def _to_unit_range(image: np.ndarray, windowed: bool) -> np.ndarray:
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise DataError("radiograph contains non-finite values")
    if windowed:
        low, high = float(image.min()), float(image.max())
    else:
        low, high = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    if high - low <= 0:
        raise DataError("radiograph is blank (all pixels have the same value)")
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            pair = tuple(float(v) for v in value) if value is not None else ()
        except (TypeError, ValueError):
            pair = ()
        if len(pair) == 2 and all(np.isfinite(p) and p > 0 for p in pair):
            return pair  # type: ignore[return-value]
    return UNKNOWN_SPACING


def _check_frame(array: np.ndarray, min_side: int, not_2d: str) -> None:
    """A radiograph is one 2-D frame with both sides at least ``min_side`` pixels."""
    if array.ndim != 2:
        raise DataError(not_2d)
    if min(array.shape) < min_side:
        raise DataError(f"radiograph of {array.shape[0]} x {array.shape[1]} pixels is smaller "
                        f"than the minimum side of {min_side}")


def read_xray_dicom(ds: pydicom.Dataset, min_side: int = 64
                    ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Decode a CR/DX dataset into ([0, 1] image with bone white, pixel spacing in mm or None
    when the file records none)."""
    try:
        raw = ds.pixel_array
    except Exception as e:
        raise DataError(f"cannot decode pixel data ({type(e).__name__}: {e})") from e
    _check_frame(raw, min_side, f"expected one greyscale frame, got pixel array of shape "
                                f"{raw.shape}")
    image = apply_modality_lut(raw, ds)
    windowed = "VOILUTSequence" in ds or "WindowCenter" in ds
    if windowed:
        image = apply_voi_lut(image, ds, index=0, prefer_lut=True)
    unit = _to_unit_range(np.asarray(image), windowed)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    elif photometric != "MONOCHROME2":
        raise DataError(f"PhotometricInterpretation {photometric} is not a greyscale radiograph")
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        unit = 1.0 - unit
    return np.ascontiguousarray(unit, dtype=np.float32), _spacing(ds)


def read_xray_image(path: Path, min_side: int = 64) -> tuple[np.ndarray, None]:
    """Read a PNG/JPEG radiograph into ([0, 1] image, None: the file records no spacing)."""
    try:
        with Image.open(path) as im:
            im.load()
            if getattr(im, "n_frames", 1) != 1:
                raise DataError(f"animated/multi-frame image ({im.n_frames} frames)")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(im, dtype=np.float32)
                scale = 65535.0 if im.mode.startswith("I;16") or array.max() > 255 else 255.0
                array = array / scale
            else:
                if im.mode not in ("L", "1"):
                    im = im.convert("L")
                array = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"not a readable PNG/JPEG image ({type(e).__name__}: {e})") from e
    _check_frame(array, min_side, f"unexpected image shape {array.shape}")
    if float(array.max() - array.min()) <= 0:
        raise DataError("radiograph is blank (all pixels have the same value)")
    return np.ascontiguousarray(np.clip(array, 0, 1), dtype=np.float32), UNKNOWN_SPACING
