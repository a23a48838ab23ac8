"""The one in-memory image type of the data layer, and the site's secret salt for identifiers.

A :class:`Sample` carries pixels and geometry only: an array, its spacing, the modality and a
non-identifying ``sample_id`` (a salted hash). It never holds a patient identifier, a path or a
DICOM header value, so that nothing identifying can travel with it by accident.

The salt is a random secret created once per site (``WORK_DIR/state/data-salt``, mode 0600).
Salted hashes are stable across restarts of the same site, yet cannot be recomputed from a known
PatientID or UID by anyone without the salt - which never leaves the site.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["Sample", "DataError", "Rejection", "load_or_create_salt", "salted_hash"]

Modality = Literal["ct", "xray"]
SALT_RELPATH = Path("state") / "data-salt"


class DataError(ValueError):
    """An input image that cannot be used; the message is the human reason shown to the site."""


@dataclass(frozen=True)
class Rejection:
    """A file (or folder) that was not used, and why. Site-local: it holds a path."""

    path: str
    reason: str


@dataclass(frozen=True, eq=False)
class Sample:
    """One image ready for preprocessing.

    ``array`` is float32. CT: (D, H, W) in Hounsfield units, axis 0 along the slice normal.
    X-ray: (H, W) in [0, 1] with bright = dense (bone white). ``spacing`` is in mm in the array's
    axis order. ``sample_id`` is a salted hash, never a path, UID or header value.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    modality: Modality
    sample_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.array, np.ndarray) or self.array.dtype != np.float32:
            raise TypeError("Sample.array must be a float32 numpy array")
        expected_ndim = 3 if self.modality == "ct" else 2
        if self.modality not in ("ct", "xray"):
            raise ValueError(f"Sample.modality must be 'ct' or 'xray', got {self.modality!r}")
        if self.array.ndim != expected_ndim:
            raise ValueError(f"{self.modality} Sample needs a {expected_ndim}D array, "
                             f"got shape {self.array.shape}")
        if len(self.spacing) != expected_ndim or not all(s > 0 for s in self.spacing):
            raise ValueError(f"Sample.spacing must be {expected_ndim} positive values, "
                             f"got {self.spacing}")


def load_or_create_salt(work_dir: str | Path) -> bytes:
    """Return the site's secret salt, creating it (32 random bytes, mode 0600) on first use."""
    path = Path(work_dir) / SALT_RELPATH
    if path.exists():
        salt = bytes.fromhex(path.read_text().strip())
        if len(salt) < 16:
            raise DataError(f"{path}: salt file is corrupt (expected 32 hex-encoded bytes)")
        return salt
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(salt.hex())
    return salt


def salted_hash(salt: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``value`` under the site salt, domain-separated by ``kind``; 20 hex chars."""
    digest = hmac.new(salt, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind[:2]}-{digest[:20]}"
