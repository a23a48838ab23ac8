"""The on-disk checkpoint format, shared by centralized pretraining, the aggregator and export.

A checkpoint is two files side by side: ``NAME.safetensors`` (tensors only, no pickle) and
``NAME.json`` (everything a person or a resuming process needs to know about it). Both are written
atomically: to a temporary file in the same directory, flushed and fsynced, then renamed over the
target, and the directory is fsynced. The JSON sidecar is written last and is the commit point: a
checkpoint whose sidecar is missing is incomplete and ignored by :func:`latest_checkpoint`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_save_tensors",
    "atomic_write_json",
    "append_jsonl",
    "save_checkpoint",
    "load_checkpoint",
    "read_tensors_if",
    "latest_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_replace(path: Path, write: Callable[[str], None], mode: int) -> None:
    """Have ``write`` fill a temp file beside ``path``, fsync it, then rename it over ``path``:
    a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_bytes(data), mode)


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None, mode: int = 0o644) -> None:
    """:func:`atomic_write_bytes` for tensors, streamed from their memory to the file.

    ``safetensors.torch.save`` builds the whole file as bytes first (one more copy of the state
    in memory, measured as the coordinator's peak); ``save_file`` writes from the
    tensors' own buffers.
    """
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata), mode)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON object as a line, fsynced (logs such as rounds.jsonl and metrics.jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    directory: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write ``name.safetensors`` then ``name.json`` (the commit point) into ``directory``."""
    directory = Path(directory)
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_save_tensors(directory / f"{name}.safetensors", contiguous)
    atomic_write_json(directory / f"{name}.json", meta)
    return directory / f"{name}.safetensors"


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (path to either of its two files)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    try:
        meta = json.loads(js.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{js}: checkpoint sidecar missing (incomplete checkpoint)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{js}: unreadable checkpoint sidecar: {e}") from e
    try:
        tensors = load(st.read_bytes())
    except FileNotFoundError as e:
        raise CheckpointError(f"{st}: checkpoint tensors missing") from e
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{st}: corrupt checkpoint tensors: {e}") from e
    return tensors, meta


def read_tensors_if(path: str | Path, accept: Callable[[dict[str, str]], bool]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """A safetensors file's (tensors, metadata) when ``accept(metadata)``, else None (also for a
    missing file); the tensors of a file not accepted are never read. ``CheckpointError`` names
    an unreadable file. For state a process keeps beside its work (a site's exchange memory,
    the run's replay memory), written by :func:`atomic_save_tensors` with its metadata."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            if not accept(metadata):
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def latest_checkpoint(directory: str | Path, prefix: str) -> Path | None:
    """The newest complete ``{prefix}NNNN`` checkpoint in ``directory`` (by its number), or None."""
    directory = Path(directory)
    best: tuple[int, Path] | None = None
    for js in directory.glob(f"{prefix}*.json"):
        suffix = js.stem[len(prefix):]
        if not suffix.isdigit() or not js.with_suffix(".safetensors").exists():
            continue
        n = int(suffix)
        if best is None or n > best[0]:
            best = (n, js.with_suffix(".safetensors"))
    return best[1] if best else None
