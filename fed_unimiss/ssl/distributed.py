"""Data-parallel training of one model by several processes (torch.distributed).

The engine stays one readable loop; this module holds the few collective operations that make N
processes train exactly the model one process would train on the same global batch:

- :func:`shard`: every rank takes every N-th item of the step's global batch (the batch is a
  function of (recipe, global step), so no sampler state has to be shared);
- :func:`agree_on_sizes`: the ranks learn each other's usable item counts before the step; a
  step where any shard is empty is skipped by all ranks alike (the loss would otherwise wait
  forever for that rank's center update);
- :func:`average_gradients`: the sample-weighted mean of the ranks' gradients, one flat
  all-reduce per step (the DINO center is all-reduced inside :class:`DINOLoss`);
- :func:`launch`: start N processes (gloo on CPU, nccl on CUDA) that run a function and fail
  together: if one dies, the others are stopped and the launcher raises, so nothing half-done is
  ever committed (only rank 0 writes checkpoints, and a checkpoint is committed by its sidecar).

With one process none of this runs: every function is a no-op for ``world_size() == 1``.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["is_distributed", "rank", "world_size", "shard", "agree_on_sizes",
           "average_gradients", "all_reduce_mean", "launch", "WorkerFailed"]

# A rank that waits longer than this in a collective gives up (a backstop; the launcher normally
# notices a dead worker within a second and stops the others first).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


class WorkerFailed(RuntimeError):
    """A data-parallel worker died or raised; the whole step (and run) has failed."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def shard(items: Sequence[Any]) -> list[tuple[int, Any]]:
    """This rank's part of a global batch, as (position in the global batch, item) pairs."""
    r, n = rank(), world_size()
    return [(p, item) for p, item in enumerate(items) if p % n == r]


def agree_on_sizes(local: int, device: torch.device) -> list[int]:
    """Every rank's usable item count for this step, in rank order."""
    if not is_distributed():
        return [local]
    sizes = torch.zeros(world_size(), dtype=torch.float64, device=device)
    sizes[rank()] = local
    dist.all_reduce(sizes)
    return [int(s) for s in sizes.tolist()]


@torch.no_grad()
def average_gradients(params: Sequence[torch.nn.Parameter], local: int, total: int) -> None:
    """Replace each gradient by the sample-weighted mean over ranks: sum_r (n_r g_r) / sum_r n_r.

    Each rank's gradient is the mean over its own items, so this is the gradient of the mean
    loss over the global batch, whatever the split. Parameters without a gradient (the 3D-only
    tensors in an X-ray step, a frozen last layer) have none on every rank alike and are skipped.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).mul_(local / total)
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_mean(value: float, weight: int, device: torch.device) -> float:
    """Weighted mean of a per-rank scalar (e.g. the loss of the rank's items) over ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([value * weight, float(weight)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


# ---------------------------------------------------------------------- process launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(index: int, fn: Callable[..., Any], args: tuple, world: int, port: int,
            backend: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=index, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], args: tuple, nproc: int, *, device: torch.device,
           threads: int) -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh processes forming one process group; wait for all.

    ``fn`` must be importable (a module-level function) and gets its rank from
    :func:`rank`. gloo for CPU, nccl for CUDA. The processes listen on a free loopback port
    only. Raises :class:`WorkerFailed` naming the rank if any process raises or dies (the
    others are terminated first).
    """
    if nproc < 2:
        raise ValueError(f"launch: nproc must be >= 2, got {nproc}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        mp.start_processes(_worker, args=(fn, args, nproc, _free_port(), backend, threads),
                           nprocs=nproc, join=True, start_method="spawn")
    except mp.ProcessRaisedException as e:
        raise WorkerFailed(f"data-parallel worker {e.error_index} of {nproc} failed: "
                           f"{_last_line(str(e))}") from None
    except mp.ProcessExitedException as e:
        raise WorkerFailed(f"data-parallel worker {e.error_index} of {nproc} died (exit code "
                           f"{e.exit_code}); the step it was in did not complete") from None


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text
