"""Data-layer settings: how a site's images become training arrays.

Loaded from YAML (``configs/data/default.yaml``) with :func:`fed_unimiss.config.load_yaml`. The
defaults follow the UniMiSS reference: CT resampled to 3 x 1 x 1 mm (z, y, x) and cut into
24-slice sub-volumes, intensities HU / 1024 *without clipping* (the reference does not clip; air is
about -0.98, dense bone can exceed 1.0 - views and models must not assume a bounded range), X-rays
stored at 512 x 512 in [0, 1] with bright = dense.

The two ``*_settings_hash`` methods key the site cache: changing a CT field rebuilds only the CT
entries, changing ``xray_size`` rebuilds only the X-ray entries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fed_unimiss.config import load_yaml

__all__ = ["DataConfig", "load_data_config"]


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing settings of one site (all lengths in mm, sizes in voxels/pixels)."""

    # Target CT voxel spacing (z, y, x) in mm; the reference uses 3 mm slices, 1 mm pixels.
    ct_spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)
    # Slices per cached CT tile; UniMiSS takes 16-slice views from 24-slice sub-volumes.
    ct_tile_depth: int = 24
    # Start-to-start distance of consecutive tiles; equal to the depth means no overlap.
    ct_tile_stride: int = 24
    # Training input = HU / hu_scale (no clipping, as in the reference).
    hu_scale: float = 1024.0
    # A CT series/volume needs at least this many slices before resampling to be a volume.
    min_ct_slices: int = 8
    # Relative deviation from the median slice step tolerated before a series is "uneven".
    slice_step_tolerance: float = 0.1
    # Side of the square X-ray stored in the cache (reference 512).
    xray_size: int = 512
    # Smallest X-ray side (pixels) accepted; smaller images are rejected as thumbnails.
    min_xray_side: int = 64
    # Pixel spacing (mm) assumed for radiographs whose file records none (PNG/JPEG, DICOM
    # without PixelSpacing). `data check` shows those as "unknown"; the X-ray path resizes to
    # xray_size and does not depend on it, but every Sample carries a spacing.
    xray_default_spacing: tuple[float, float] = (1.0, 1.0)

    def validate(self) -> None:
        if len(self.ct_spacing) != 3 or any(s <= 0 for s in self.ct_spacing):
            raise ValueError(f"ct_spacing: expected three positive mm values, got {self.ct_spacing}")
        for name in ("ct_tile_depth", "ct_tile_stride", "min_ct_slices", "xray_size",
                     "min_xray_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if len(self.xray_default_spacing) != 2 or any(s <= 0 for s in self.xray_default_spacing):
            raise ValueError(f"xray_default_spacing: expected two positive mm values, got "
                             f"{self.xray_default_spacing}")
        if self.ct_tile_stride > self.ct_tile_depth:
            raise ValueError(
                f"ct_tile_stride: {self.ct_tile_stride} is larger than ct_tile_depth "
                f"{self.ct_tile_depth}, which would skip slices; use at most the depth"
            )
        if self.min_ct_slices < 2:
            raise ValueError(f"min_ct_slices: a volume needs at least 2 slices, got "
                             f"{self.min_ct_slices}")
        if self.hu_scale <= 0:
            raise ValueError(f"hu_scale: must be positive, got {self.hu_scale}")
        if not 0 < self.slice_step_tolerance < 1:
            raise ValueError(f"slice_step_tolerance: expected a fraction in (0, 1), got "
                             f"{self.slice_step_tolerance}")

    def ct_settings_hash(self) -> str:
        """Hash of the fields that change cached CT tiles (and how series are accepted)."""
        return _hash_fields(self, ("ct_spacing", "ct_tile_depth", "ct_tile_stride", "hu_scale",
                                   "min_ct_slices", "slice_step_tolerance"))

    def xray_settings_hash(self) -> str:
        """Hash of the fields that change cached X-rays."""
        return _hash_fields(self, ("xray_size", "min_xray_side"))


def _hash_fields(cfg: DataConfig, names: tuple[str, ...]) -> str:
    payload = json.dumps({n: getattr(cfg, n) for n in names}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_data_config(path: str | Path, section: str | None = None) -> DataConfig:
    """Load and validate a :class:`DataConfig` from YAML (errors name the file and field)."""
    return load_yaml(DataConfig, path, section)
