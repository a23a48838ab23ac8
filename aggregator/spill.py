"""A decoded reply parked on local disk until its round closes: memory that does not grow with sites.

The round-relative checks (:mod:`aggregator.screening`: norm against the round's median,
direction against the coordinate-wise median) and the robust aggregations need every reply of
the round, so the strategy cannot fold a reply and forget it. Holding the decoded replies in
memory cost one state per site (measured: 7.6-8x the state in a tiny round). Instead each
reply is decoded, validated and written here one tensor at a time as it arrives, and read back
one tensor at a time when the round closes. Reads use ``numpy.fromfile`` into ordinary memory
(not a memory map), so a read tensor is freed as soon as it is folded and the process's resident
memory stays at one state plus one tensor per reply.

The files live under the run's ``.spill/`` folder (coordinator-local, like the checkpoints,
never sent anywhere) and are deleted when the round closes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["SpilledState", "SpillWriter", "read_slice", "chunk_size"]

# Elements per slice when many replies of one tensor are combined at once (median, cosine):
# about 2**21 float64 values in all, whatever the number of replies (~50 MB with the sort's
# copies), so one large tensor (tiny's 64 MB head layer) never needs a multiple of itself.
SLICE_BUDGET = 2**21


def chunk_size(replies: int) -> int:
    return max(4096, SLICE_BUDGET // max(1, replies))


def read_slice(state: Mapping[str, torch.Tensor], name: str, start: int, stop: int
               ) -> torch.Tensor:
    """Flat elements [start, stop) of ``state[name]``, reading no more than that when it can."""
    sliced = getattr(state, "slice", None)
    if sliced is not None:
        return sliced(name, start, stop)
    return state[name].reshape(-1)[start:stop]


class SpilledState(Mapping[str, torch.Tensor]):
    """A read-only ``name -> fp32 tensor`` mapping backed by one file; each access reads it."""

    def __init__(self, path: Path, layout: dict[str, tuple[int, tuple[int, ...]]]):
        self.path = path
        self._layout = layout

    def __getitem__(self, name: str) -> torch.Tensor:
        offset, shape = self._layout[name]
        count = math.prod(shape)
        with open(self.path, "rb") as f:
            values = np.fromfile(f, dtype=np.float32, count=count, offset=offset)
        if values.size != count:
            raise OSError(f"{self.path}: truncated spill file at {name}")
        return torch.from_numpy(values).view(shape)

    def slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of ``name`` (a partial read of the file)."""
        offset, shape = self._layout[name]
        stop = min(stop, math.prod(shape))
        count = max(0, stop - start)
        with open(self.path, "rb") as f:
            values = np.fromfile(f, dtype=np.float32, count=count, offset=offset + 4 * start)
        if values.size != count:
            raise OSError(f"{self.path}: truncated spill file at {name}")
        return torch.from_numpy(values)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class SpillWriter:
    """Appends fp32 tensors to a new spill file; :meth:`finish` returns the reading side."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._file = os.fdopen(fd, "wb")
        self.path = path
        self._layout: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        arr = tensor.detach().to(torch.float32).contiguous().numpy()
        self._file.write(arr.reshape(-1).data)
        self._layout[name] = (self._offset, tuple(tensor.shape))
        self._offset += arr.nbytes

    def finish(self) -> SpilledState:
        self._file.close()
        return SpilledState(self.path, self._layout)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
