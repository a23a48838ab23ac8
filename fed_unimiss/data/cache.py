"""The site cache: preprocessed, memory-mappable arrays and a JSON index, rebuilt incrementally.

Layout under ``WORK_DIR/cache/``::

    index.json                   the SiteIndex (site-local: holds paths and rejections)
    ct/<key>-<tile>.npy          CT tiles, (ct_tile_depth, H, W) float32, values HU / hu_scale
    xray/<key>.npy               radiographs, (xray_size, xray_size) float32 in [0, 1]

CT tiles are stored already divided by ``hu_scale`` (not clipped), so the trainer reads them as
they are. ``<key>`` hashes the image identity, each input file's path, size and mtime, and the
modality's settings hash from :class:`DataConfig`; an unchanged key whose arrays are on disk is
reused, so touching one file or changing ``xray_size`` rebuilds only the affected entries. Arrays
no longer referenced are deleted. Every .npy is written to a temporary file and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fed_unimiss.checkpoint import atomic_write_json
from fed_unimiss.data.config import DataConfig
from fed_unimiss.data.preprocess import resample_volume, resize_xray, tile_volume
from fed_unimiss.data.readers import read_sample
from fed_unimiss.data.sample import DataError, Rejection, load_or_create_salt, salted_hash
from fed_unimiss.data.scan import UsableImage, scan

__all__ = ["CacheEntry", "SiteIndex", "build_cache", "INDEX_VERSION"]

logger = logging.getLogger(__name__)

INDEX_VERSION = 1


@dataclass(frozen=True)
class CacheEntry:
    """One cached array: where it is, its shape, and its (salted, site-local) identifiers."""

    path: Path
    shape: tuple[int, ...]
    sample_id: str
    patient_key: str
    tile: int = 0


@dataclass
class SiteIndex:
    """What a site can train on. ``summary()`` is the only part meant to leave the site."""

    work_dir: Path
    ct_tiles: list[CacheEntry] = field(default_factory=list)
    xrays: list[CacheEntry] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    hu_scale: float = 1024.0
    ct_tile_depth: int = 24
    xray_size: int = 512
    built: int = 0  # images decoded in the last build_cache
    reused: int = 0  # images whose cached arrays were still valid

    def summary(self) -> dict[str, int]:
        """Counts only - no names, paths or identifiers - safe to report to the aggregator."""
        return {
            "ct_volumes": len({e.sample_id for e in self.ct_tiles}),
            "ct_tiles": len(self.ct_tiles),
            "xrays": len(self.xrays),
            "patients": len({e.patient_key for e in self.ct_tiles + self.xrays}),
            "rejected": len(self.rejected),
        }

    @classmethod
    def load(cls, work_dir: str | Path) -> SiteIndex:
        """Read the index written by :func:`build_cache` (no scanning, no decoding)."""
        work_dir = Path(work_dir)
        raw = _read_index(work_dir / "cache" / "index.json")
        if raw is None:
            raise DataError(f"{work_dir / 'cache' / 'index.json'}: no valid site index; run "
                            "build_cache first")
        return _index_from_raw(work_dir, raw, built=0, reused=0)


def _read_index(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("version") != INDEX_VERSION:
        return None
    return raw


def _index_from_raw(work_dir: Path, raw: dict[str, Any], built: int, reused: int) -> SiteIndex:
    cache = work_dir / "cache"
    index = SiteIndex(work_dir=work_dir, hu_scale=raw["hu_scale"],
                      ct_tile_depth=raw["ct_tile_depth"], xray_size=raw["xray_size"],
                      rejected=[Rejection(r["path"], r["reason"]) for r in raw["rejected"]],
                      built=built, reused=reused)
    # Scan order (sorted paths), not key order (a hash of path and mtime): a copy of the same data
    # elsewhere, or with new mtimes, gives the same dataset order and so the same training run.
    entries = raw["entries"]
    for key in sorted(entries, key=lambda k: (entries[k].get("order", -1), k)):
        entry = entries[key]
        target = index.ct_tiles if entry["modality"] == "ct" else index.xrays
        for item in entry["items"]:
            target.append(CacheEntry(cache / item["file"], tuple(item["shape"]),
                                     entry["sample_id"], entry["patient_key"], item["tile"]))
    return index


def _source_key(image: UsableImage, cfg: DataConfig) -> str:
    settings = cfg.ct_settings_hash() if image.modality == "ct" else cfg.xray_settings_hash()
    h = hashlib.sha256(f"{INDEX_VERSION}\0{settings}\0{image.identity}".encode())
    for path in image.files:
        st = path.stat()
        h.update(f"\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.float32))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build_entry(image: UsableImage, key: str, cache: Path, cfg: DataConfig,
                 salt: bytes) -> dict[str, Any]:
    sample, pkey = read_sample(image, salt, cfg.min_xray_side, cfg.xray_default_spacing)
    items = []
    if sample.modality == "ct":
        volume = resample_volume(sample.array, sample.spacing, cfg.ct_spacing)
        volume /= np.float32(cfg.hu_scale)
        for t, tile in enumerate(tile_volume(volume, cfg.ct_tile_depth, cfg.ct_tile_stride)):
            rel = f"ct/{key}-{t:03d}.npy"
            _save_npy(cache / rel, tile)
            items.append({"file": rel, "shape": list(tile.shape), "tile": t})
    else:
        rel = f"xray/{key}.npy"
        image_out = resize_xray(sample.array, cfg.xray_size)
        _save_npy(cache / rel, image_out)
        items.append({"file": rel, "shape": list(image_out.shape), "tile": 0})
    return {"modality": sample.modality, "sample_id": sample.sample_id, "patient_key": pkey,
            "items": items}


def _still_valid(entry: dict[str, Any] | None, cache: Path) -> bool:
    if not entry:
        return False
    for item in entry.get("items", []):
        path = cache / item["file"]
        expected = 128 + 4 * int(np.prod(item["shape"]))  # npy header + float32 data, at least
        try:
            if path.stat().st_size < expected:
                return False
        except OSError:
            return False
    return bool(entry.get("items"))


def _remove_orphans(cache: Path, entries: dict[str, Any]) -> None:
    keep = {item["file"] for e in entries.values() for item in e["items"]}
    for sub in ("ct", "xray"):
        folder = cache / sub
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if f"{sub}/{path.name}" not in keep:
                path.unlink(missing_ok=True)


def build_cache(roots: Path | str | Sequence[Path | str], work_dir: str | Path,
                cfg: DataConfig | None = None) -> SiteIndex:
    """Scan ``roots``, (re)build the cached arrays that changed, write and return the index.

    Never raises for bad images: they end up in ``SiteIndex.rejected`` with a reason.
    """
    cfg = cfg or DataConfig()
    work_dir = Path(work_dir)
    cache = work_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    salt = load_or_create_salt(work_dir)
    salt_id = salted_hash(salt, "salt-check", "fed-unimiss")
    old = _read_index(cache / "index.json") or {}
    old_entries = old.get("entries", {}) if old.get("salt_id") == salt_id else {}
    report = scan(roots, cfg)
    rejected = list(report.rejected)
    entries: dict[str, Any] = {}
    built = reused = 0
    unknown = sum(u.modality == "xray" and u.spacing is None for u in report.usable)
    if unknown:  # once per scan, not once per image
        logger.info("%d X-ray(s) record no pixel spacing (PNG/JPEG or DICOM without it): "
                    "training uses the configured default %s mm (data.xray_default_spacing)",
                    unknown, " x ".join(f"{s:g}" for s in cfg.xray_default_spacing))
    for order, image in enumerate(report.usable):
        try:
            key = _source_key(image, cfg)
            if _still_valid(old_entries.get(key), cache):
                entries[key] = {**old_entries[key], "order": order}
                reused += 1
                continue
            entries[key] = {**_build_entry(image, key, cache, cfg, salt), "order": order}
            built += 1
            logger.info("cached %s (%d array(s))", image.name, len(entries[key]["items"]))
        except DataError as e:
            rejected.append(Rejection(str(image.files[0]), str(e)))
        except OSError as e:
            rejected.append(Rejection(str(image.files[0]), f"cannot read or cache: {e}"))
    raw = {"version": INDEX_VERSION, "salt_id": salt_id, "hu_scale": cfg.hu_scale,
           "ct_tile_depth": cfg.ct_tile_depth, "xray_size": cfg.xray_size,
           "ct_settings": cfg.ct_settings_hash(), "xray_settings": cfg.xray_settings_hash(),
           "entries": entries,
           "rejected": [{"path": r.path, "reason": r.reason} for r in rejected]}
    atomic_write_json(cache / "index.json", raw)
    _remove_orphans(cache, entries)
    logger.info("site cache: %d built, %d reused, %d rejected", built, reused, len(rejected))
    return _index_from_raw(work_dir, raw, built=built, reused=reused)
