"""Walk a site's folder tree and sort every file into a usable image or a rejection with a reason.

The scan is the single place that decides what a site trains on; :func:`fed_unimiss.data.cache.
build_cache` and ``fed-unimiss data check`` both call it. It never raises for bad data: each
failure becomes a :class:`Rejection` with a reason a hospital's IT staff can act on.

Rules (also in docs/data.md):
- Hidden files and folders (name starting with ".") are skipped silently, and so is every folder
  holding a file named ``.fed-unimiss-ignore`` (labels, exports, the site's own work dir).
- Symbolic links are followed, with loop detection on (device, inode) of every folder visited.
- ``.nii``/``.nii.gz`` are NIfTI CT volumes, ``.mhd`` MetaImage CT volumes (their raw file is not
  reported separately), ``.png``/``.jpg``/``.jpeg`` radiographs; every other file is tried as
  DICOM (CT slices are grouped into series by SeriesInstanceUID per folder; CR/DX
  files are radiographs). A series is one SeriesInstanceUID within one folder.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_unimiss.data.config import DataConfig
from fed_unimiss.data.dicom_series import (
    DicomHeader,
    SeriesPlan,
    inspect_dicom,
    plan_series,
    read_dataset,
)
from fed_unimiss.data.nifti import metaimage_data_file, read_metaimage, read_nifti
from fed_unimiss.data.sample import DataError, Rejection
from fed_unimiss.data.xray import read_xray_dicom, read_xray_image

__all__ = ["UsableImage", "ScanReport", "scan", "IGNORE_MARKER"]

logger = logging.getLogger(__name__)

IGNORE_MARKER = ".fed-unimiss-ignore"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NOT_IMAGES = (".txt", ".csv", ".json", ".md", ".xml", ".pdf", ".yaml", ".yml", ".html", ".log",
              ".zip", ".gz", ".tar", ".py", ".raw", ".inv3")


@dataclass(frozen=True)
class UsableImage:
    """One image the site can train on. Site-local: it holds paths and the raw identity.

    ``identity`` (series UID or file path) and ``patient_id`` are only ever used hashed with the
    site salt; ``name`` is a display name relative to the scanned root.
    """

    modality: str  # "ct" or "xray"
    kind: str  # "dicom-series", "nifti", "metaimage", "dicom", "image"
    name: str
    files: tuple[Path, ...]
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None  # mm; None when the file records none (PNG/JPEG)
    identity: str
    patient_id: str = ""
    notes: tuple[str, ...] = ()
    plan: SeriesPlan | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"modality": self.modality, "kind": self.kind, "name": self.name,
                "files": len(self.files), "shape": list(self.shape),
                "spacing": None if self.spacing is None else [round(s, 4) for s in self.spacing],
                "notes": list(self.notes)}


@dataclass
class ScanReport:
    """Result of :func:`scan`: usable images and rejected files/folders (path, reason)."""

    usable: list[UsableImage] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    files_seen: int = 0
    roots: list[Path] = field(default_factory=list)  # the scanned folders/files (absolute)

    def display_path(self, path: str | Path) -> str:
        """``path`` relative to the scanned folder (see :func:`display_name`)."""
        return display_name(Path(path), self.roots)

    def summary(self) -> dict[str, int]:
        """Counts only (no names), e.g. for logs that might be shared."""
        return {
            "files_seen": self.files_seen,
            "ct_volumes": sum(u.modality == "ct" for u in self.usable),
            "xrays": sum(u.modality == "xray" for u in self.usable),
            "rejected": len(self.rejected),
        }

    def to_json(self) -> dict[str, Any]:
        return {"usable": [u.to_json() for u in self.usable],
                "rejected": [{"path": self.display_path(r.path), "reason": r.reason}
                             for r in self.rejected],
                "summary": self.summary()}


@dataclass
class _State:
    cfg: DataConfig
    report: ScanReport
    visited: set[tuple[int, int]] = field(default_factory=set)
    ct_headers: dict[tuple[Path, str], list[DicomHeader]] = field(
        default_factory=lambda: defaultdict(list))
    roots: list[Path] = field(default_factory=list)

    def reject(self, path: Path | str, reason: str) -> None:
        logger.debug("rejected %s: %s", path, reason)
        self.report.rejected.append(Rejection(str(path), reason))


def display_name(path: Path, roots: list[Path]) -> str:
    """``path`` relative to the scanned folder; with several roots, after the root's name (so
    names from two roots stay apart); the root itself by its name."""
    for root in roots:
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        if str(rel) == ".":
            return root.name
        return str(rel) if len(roots) == 1 else str(Path(root.name) / rel)
    return str(path)


_display = display_name


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _check_file(path: Path) -> None:
    """Raise a DataError for files that cannot be opened or are empty."""
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError("symbolic link loop (too many levels of symbolic links)") from e
        if e.errno == errno.ENOENT:
            raise DataError("broken symbolic link or vanished file") from e
        raise DataError(f"cannot access file: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise DataError("not a regular file (device, FIFO or socket)")
    if st.st_size == 0:
        raise DataError("empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"cannot open file: {e.strerror}") from e


def _scan_file(path: Path, state: _State, skip: set[Path]) -> None:
    if path in skip:
        return
    state.report.files_seen += 1
    _check_file(path)
    cfg, suffix, name = state.cfg, _suffix(path), _display(path, state.roots)
    if suffix in NIFTI_SUFFIXES or suffix == ".mhd":
        reader, kind = (read_nifti, "nifti") if suffix != ".mhd" else (read_metaimage, "metaimage")
        _, shape, spacing = reader(path)
        if shape[0] < cfg.min_ct_slices:
            raise DataError(f"only {shape[0]} slices where a volume is expected (at least "
                            f"{cfg.min_ct_slices})")
        files = (path,) if kind == "nifti" else (path, metaimage_data_file(path))
        state.report.usable.append(UsableImage("ct", kind, name, files, shape, spacing,
                                               identity=f"file:{path.resolve()}"))
    elif suffix in IMAGE_SUFFIXES:
        image, spacing = read_xray_image(path, cfg.min_xray_side)
        state.report.usable.append(UsableImage("xray", "image", name, (path,), image.shape,
                                               spacing, identity=f"file:{path.resolve()}"))
    elif suffix in NOT_IMAGES:
        raise DataError(f"not an image file (type {suffix} is not supported)")
    else:
        header = inspect_dicom(path)
        if header.kind == "ct":
            state.ct_headers[(path.parent, header.series_uid)].append(header)
            return
        image, spacing = read_xray_dicom(read_dataset(path), cfg.min_xray_side)
        state.report.usable.append(UsableImage(
            "xray", "dicom", name, (path,), image.shape, spacing,
            identity=f"file:{path.resolve()}", patient_id=header.patient_id))


def _walk(directory: Path, state: _State) -> None:
    try:
        st = directory.stat()
        key = (st.st_dev, st.st_ino)
        if key in state.visited:
            state.reject(directory, "symbolic link loop: this folder was already scanned")
            return
        state.visited.add(key)
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        state.reject(directory, f"cannot list folder: {e.strerror}")
        return
    names = {e.name for e in entries}
    if IGNORE_MARKER in names:
        logger.debug("skipping %s (it holds %s)", directory, IGNORE_MARKER)
        return
    skip = set()
    for e in entries:
        if e.name.lower().endswith(".mhd"):
            raw = metaimage_data_file(Path(e.path))
            if raw is not None:
                skip.add(raw)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            _walk(path, state)
            continue
        try:
            _scan_file(path, state, skip)
        except DataError as e:
            state.reject(path, str(e))
        except Exception as e:  # never let one file stop a site
            logger.debug("unexpected error on %s", path, exc_info=True)
            state.reject(path, f"unexpected error ({type(e).__name__}: {e})")


def _assemble_series(state: _State) -> None:
    """Plan every (folder, SeriesInstanceUID) group; copies of a series in two folders stay two."""
    per_folder: dict[Path, int] = defaultdict(int)
    for folder, _ in state.ct_headers:
        per_folder[folder] += 1
    for (folder, uid), headers in state.ct_headers.items():
        number = headers[0].series_number or "?"
        label = f"{_display(folder, state.roots)} (series {number}, {len(headers)} files)"
        try:
            plan = plan_series(headers, state.cfg.min_ct_slices, state.cfg.slice_step_tolerance)
        except DataError as e:
            state.reject(folder, f"series {number} ({len(headers)} files): {e}")
            continue
        notes = []
        if per_folder[folder] > 1:
            notes.append(f"folder holds {per_folder[folder]} series; each is read separately")
        state.report.usable.append(UsableImage(
            "ct", "dicom-series", label, plan.files, plan.shape, plan.spacing,
            identity=f"series:{folder.resolve()}:{uid}", patient_id=plan.patient_id,
            notes=tuple(notes), plan=plan))


def scan(root: Path | str | Sequence[Path | str], cfg: DataConfig | None = None) -> ScanReport:
    """Scan one or more folders (or files) and return usable images and rejections.

    Never raises for bad data; a root that does not exist is itself a rejection.
    """
    cfg = cfg or DataConfig()
    roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
    absolute = [r.absolute() for r in roots]
    state = _State(cfg=cfg, report=ScanReport(roots=absolute), roots=absolute)
    for r in state.roots:
        if r.is_dir():
            _walk(r, state)
        elif r.exists() or r.is_symlink():
            try:
                _scan_file(r, state, set())
            except DataError as e:
                state.reject(r, str(e))
            except Exception as e:
                state.reject(r, f"unexpected error ({type(e).__name__}: {e})")
        else:
            state.reject(r, "does not exist")
    _assemble_series(state)
    state.report.usable.sort(key=lambda u: (u.modality, u.name))
    return state.report
