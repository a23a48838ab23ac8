"""Where and how a process computes: device, precision, data-parallel workers.

These are properties of the machine that trains, not of the recipe: two hospitals of one
federation train the same recipe, one on a CPU server in fp32, one on two GPUs in bf16. So they
come from the command line (``--device``, ``--precision``, ``--nproc``) or a site's settings
(``device``, ``precision``, ``workers`` in site.yaml), never from the recipe the aggregator sends.

- ``device``: ``auto`` (CUDA if present, else Apple MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N``
  or ``mps``.
- ``precision``: ``fp32``; ``bf16`` or ``fp16`` autocast the forward passes while the weights,
  the optimiser state, the EMA teacher and the DINO center stay fp32; fp16 adds a gradient scaler
  (bf16 has fp32's exponent range and needs none).
- ``workers``: data-parallel processes that train one model (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fed_unimiss import exchange as ex

__all__ = ["Runtime", "PRECISIONS", "resolve_device", "autocast", "autocast_dtype",
           "grad_scaler"]

PRECISIONS = ("fp32", "bf16", "fp16")
Precision = Literal["fp32", "bf16", "fp16"]

_DEVICES = "auto, cpu, cuda, cuda:N or mps"

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` setting; a clear error if it is absent on this machine."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ValueError("device mps: Apple's Metal backend is not available on this machine "
                             "(use auto or cpu)")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"device {name!r}: expected cuda or cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise ValueError(f"device {name}: no CUDA GPU is visible to this process "
                             f"(torch {torch.__version__}, CUDA build: "
                             f"{torch.version.cuda or 'no'}); use auto or cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {name}: this machine has {torch.cuda.device_count()} "
                             f"CUDA GPU(s), numbered from 0")
        return torch.device(name)
    raise ValueError(f"device {name!r}: expected {_DEVICES}")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision, None for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return _DTYPES.get(precision)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed-precision forward on ``device`` (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only: fp16 gradients underflow without one.

    It starts at 2^10, not torch's 2^16: a UniMiSS CT step's loss is a sum of four DINO terms
    (~20 at the start), and with 2^16 the first ~8 steps of a micro run overflowed and were
    skipped while the scaler calibrated (tests/ssl/test_runtime.py).
    """
    return torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=precision == "fp16")


@dataclass(frozen=True)
class Runtime:
    """Device, precision and data-parallel workers of one training process group."""

    # auto | cpu | cuda | cuda:N | mps
    device: str = "auto"
    # fp32 | bf16 | fp16 (see the module docstring)
    precision: Precision = "fp32"
    # Data-parallel processes that train one model; 1 = no torch.distributed.
    workers: int = 1

    def validate(self) -> None:
        autocast_dtype(self.precision)
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers: must be an integer >= 1, got {self.workers!r}")
        resolve_device(self.device)

    def torch_device(self, rank: int = 0) -> torch.device:
        """The device of data-parallel rank ``rank``: on CUDA, one GPU per worker."""
        device = resolve_device(self.device)
        if device.type == "cuda" and self.workers > 1 and device.index is None:
            return torch.device("cuda", rank % torch.cuda.device_count())
        return device

    # ---- a site's node config (the SuperNode hands it to every ClientApp message) ----
    def to_node_config(self) -> dict[str, Any]:
        return {ex.NODE_DEVICE: self.device, ex.NODE_PRECISION: self.precision,
                ex.NODE_WORKERS: self.workers}

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Runtime:
        """The site's runtime; keys that are absent take the defaults. Validated."""
        runtime = cls(device=str(node_config.get(ex.NODE_DEVICE, "auto")),
                      precision=str(node_config.get(ex.NODE_PRECISION, "fp32")),  # type: ignore[arg-type]
                      workers=int(node_config.get(ex.NODE_WORKERS, 1)))
        runtime.validate()
        return runtime
