"""One site's round trained by several data-parallel processes, returning one update.

A site with ``workers: N`` (several GPUs, or CPU sockets) trains its round with N processes of
:mod:`fed_unimiss.ssl.distributed`: each loads the received global state, trains its shard of
every global batch, and rank 0 hands the one resulting state back. To the aggregator the site is
one site with one update; nothing about the processes leaves it. DP sites train in one process
(their Poisson sample and noise are drawn once per step), so this is for plain training only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fed_unimiss.runtime import Runtime
from fed_unimiss.ssl import distributed
from fed_unimiss.ssl.config import Recipe

__all__ = ["run_local_data_parallel", "usable_workers"]

_STATE, _PUBLIC = "update.safetensors", "public.json"


@dataclass(frozen=True)
class _RoundJob:
    recipe: Recipe
    total_steps: int
    state: dict[str, torch.Tensor]
    index_dir: Path
    start_step: int
    num_steps: int
    interval: int
    runtime: Runtime
    seed: int
    scratch: Path


def run_local_data_parallel(recipe: Recipe, total_steps: int, state: dict[str, torch.Tensor],
                            index_dir: Path, start_step: int, num_steps: int, *, interval: int,
                            runtime: Runtime, seed: int, scratch_root: Path
                            ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Train steps [start_step, start_step + num_steps) from ``state`` with ``runtime.workers``
    processes on the site cache in ``index_dir``; returns (public metrics, exchange state).

    ``scratch_root`` (site-local) holds rank 0's result until it is read back. Raises
    :class:`~fed_unimiss.ssl.distributed.WorkerFailed` if any process fails: the round then
    fails for this site and no state is returned.
    """
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="round-", dir=scratch_root))
    try:
        job = _RoundJob(recipe, total_steps, state, index_dir, start_step, num_steps, interval,
                        runtime, seed, scratch)
        distributed.launch(_round_worker, (job,), runtime.workers,
                           device=runtime.torch_device(), threads=recipe.ssl.threads)
        public = json.loads((scratch / _PUBLIC).read_text())
        return public, load_file(str(scratch / _STATE))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def usable_workers(recipe: Recipe, workers: int) -> int:
    """How many of ``workers`` processes the recipe's batches can keep busy: each process needs
    at least one item per micro-batch of every step (a federation's recipe, not the site,
    sets the batch)."""
    smallest = min(recipe.ssl.batch_size_2d, recipe.ssl.batch_size_3d)
    return max(1, min(workers, smallest // recipe.ssl.accumulate))


def _round_worker(job: _RoundJob) -> None:
    from fed_unimiss.data.cache import SiteIndex
    from fed_unimiss.ssl.engine import SelfDistillation
    from fed_unimiss.ssl.local import NoBudget, run_local
    from fed_unimiss.ssl.site_data import SiteData

    data = SiteData.from_index(SiteIndex.load(job.index_dir))
    engine = SelfDistillation(job.recipe, job.total_steps,
                              device=job.runtime.torch_device(distributed.rank()),
                              precision=job.runtime.precision)
    engine.load_exchange_state(job.state)
    torch.manual_seed(job.seed)
    local = run_local(engine, data, job.start_step, job.num_steps, NoBudget(),
                      interval=job.interval)
    if distributed.rank() == 0:
        save_file({k: v.contiguous() for k, v in engine.exchange_state().items()},
                  str(job.scratch / _STATE))
        (job.scratch / _PUBLIC).write_text(json.dumps(local.public))
