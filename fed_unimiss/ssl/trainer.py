"""Centralized (pooled or single-site) pretraining: the DINO-style recipe, top to bottom.

``pretrain`` builds the site cache of every data folder in RUN/work, trains the
:class:`~fed_unimiss.ssl.engine.SelfDistillation` engine with a progress bar, TensorBoard scalars
(RUN/tb) and RUN/metrics.jsonl, watches for collapse, and checkpoints to RUN.

Checkpoint layout (RUN/ckpt_SSSSSSSS.safetensors + .json, written with
:func:`fed_unimiss.checkpoint.save_checkpoint`, the JSON sidecar being the commit point):

- tensors: ``student.*``, ``teacher.*``, ``center`` (the exchange layout) and the AdamW state as
  ``optim.<param name>.{step,exp_avg,exp_avg_sq}`` in the same file, so one atomic commit covers
  model and optimizer;
- sidecar: ``step`` (the next global step to run), ``total_steps`` (schedule length), the resolved
  ``recipe``, the ``schedule`` position, the ``data`` summary (counts only) and the last metrics.

``--steps N`` stops at global step N without changing the schedule (its length is always
epochs x steps_per_epoch), so N steps, then ``--resume --steps N+M``, equals N+M steps at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fed_unimiss.checkpoint import (
    append_jsonl,
    atomic_write_json,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fed_unimiss.privacy.config import PrivacyConfig
from fed_unimiss.privacy.report import EPSILON
from fed_unimiss.runtime import Runtime
from fed_unimiss.ssl import distributed
from fed_unimiss.ssl.collapse import CollapseStats, CollapseWatch
from fed_unimiss.ssl.config import Recipe, recipe_from_dict, recipe_to_dict
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.local import run_local, training_mode, with_planned_intervals
from fed_unimiss.ssl.site_data import SiteData

__all__ = ["pretrain", "resolve_steps_per_epoch", "CHECKPOINT_PREFIX", "checkpoint_meta"]

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "ckpt_"
CHECKPOINT_KIND = "fed-unimiss-pretrain"


def resolve_steps_per_epoch(recipe: Recipe, data: SiteData) -> Recipe:
    """Fill ``ssl.steps_per_epoch`` from the data size when unset: one pass over the larger set."""
    if recipe.ssl.steps_per_epoch is not None:
        return recipe
    passes = []
    if data.has_2d:
        passes.append(math.ceil(len(data.xray) / recipe.ssl.batch_size_2d))
    if data.has_3d:
        passes.append(math.ceil(len(data.ct) / recipe.ssl.batch_size_3d))
    spe = max(passes) if passes else 1
    return dataclasses.replace(recipe, ssl=dataclasses.replace(recipe.ssl, steps_per_epoch=spe))


def checkpoint_meta(engine: SelfDistillation, step: int, data: SiteData,
                    metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON sidecar of a pretraining checkpoint (no paths, counts only)."""
    return {"kind": CHECKPOINT_KIND, "version": 1, "step": step,
            "total_steps": engine.schedules.total_steps,
            "recipe": recipe_to_dict(engine.recipe),
            "schedule": engine.schedules.position(step, data.has_2d, data.has_3d),
            "data": data.summary, "metrics": metrics or {}}


def _load_site_data(recipe: Recipe, data_dirs: Sequence[str | Path], run: Path) -> SiteData:
    from fed_unimiss.data.cache import build_cache

    for d in data_dirs:
        if not Path(d).is_dir():
            raise ValueError(f"--data {d}: not a directory")
    index = build_cache([Path(d) for d in data_dirs], run / "work", recipe.data)
    data = SiteData.from_index(index)
    log.info("data: %s", data.summary)
    if not (data.has_2d or data.has_3d):
        raise ValueError(f"no usable CT or X-ray images in {', '.join(map(str, data_dirs))} "
                         f"({len(index.rejected)} rejected; run `fed-unimiss data check`)")
    return data


class _Logger:
    """metrics.jsonl + TensorBoard + collapse watch + progress bar, fed from ``on_step``."""

    def __init__(self, run: Path, engine: SelfDistillation, progress: Any, task: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run, self.cfg = run, engine.cfg
        self.writer = SummaryWriter(str(run / "tb"))
        self.watch = CollapseWatch(engine.recipe.model.head_out_dim, engine.cfg.collapse_window)
        self.progress, self.task = progress, task
        self.last: dict[str, Any] | None = None
        self.end_step: int | None = None

    def __call__(self, m: dict[str, Any]) -> None:
        self.last = m
        step = m["step"]
        self.progress.update(self.task, advance=1, loss=m["loss"], phase=m["phase"])
        if step % self.cfg.log_every != 0 and step + 1 != self.end_step:
            return
        append_jsonl(self.run / "metrics.jsonl", m)
        for k, v in m.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"pretrain/{k}", v, step)
        if "teacher_entropy" in m:
            stats = CollapseStats(m["teacher_entropy"], m["batch_entropy"], m["kl"])
            self.watch.update(step, m["loss"], stats, m["phase"])

    def close(self) -> None:
        self.writer.close()


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]pretrain[/] {task.fields[phase]}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled)


@dataclass(frozen=True)
class _Job:
    """Everything a (data-parallel) training process needs: picklable, no open resources."""

    recipe: Recipe
    run: Path
    start: int
    total: int
    end: int
    state: dict[str, torch.Tensor] | None
    privacy: PrivacyConfig | None
    runtime: Runtime
    progress: bool


def pretrain(recipe: Recipe, data_dirs: Sequence[str | Path], run: str | Path, *,
             steps: int | None = None, resume: bool = False,
             progress: bool = True, privacy: PrivacyConfig | None = None,
             runtime: Runtime | None = None) -> dict[str, Any]:
    """Train centrally on ``data_dirs``, checkpointing to ``run``; returns a summary dict.

    Args:
        recipe: the recipe (ignored in favour of the checkpoint's recipe when resuming).
        data_dirs: one or more site folders, pooled.
        run: run directory (checkpoints, metrics.jsonl, tb/, work/ with the data cache).
        steps: stop at this global step (default: the end of the schedule).
        resume: continue from the newest complete checkpoint in ``run``.
        progress: show the rich progress bar.
        privacy: train the student with patient-level DP-SGD under a budget ledger in
            ``run/state``. A single-site DP run spends the same per-patient budget as a federated
            site: every checkpoint interval is one "round" of the ledger, the budget is spread
            over the run's intervals, and ``--resume`` keeps counting from what was spent.
            Training stops at the first checkpoint interval the budget does not allow.
        runtime: device, precision and data-parallel workers (default: auto device, fp32, one
            process). With N workers, N processes train one model on shards of every global
            batch; rank 0 alone logs and writes checkpoints, which are the same as one process's.
    """
    runtime = runtime or Runtime()
    runtime.validate()
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    # ---------------- resume point ----------------
    start, total, state = 0, None, None
    ckpt = latest_checkpoint(run, CHECKPOINT_PREFIX) if resume else None
    if resume and ckpt is None:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", run)
    if ckpt is not None:
        state, meta = load_checkpoint(ckpt)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{ckpt}: not a pretraining checkpoint (kind {meta.get('kind')!r})")
        if recipe_to_dict(recipe) != meta["recipe"]:
            log.warning("--resume: the checkpoint's recipe differs from --config; "
                        "continuing with the checkpoint's recipe")
        recipe = recipe_from_dict(meta["recipe"], f"{ckpt.with_suffix('.json')}:recipe")
        start, total = int(meta["step"]), int(meta["total_steps"])
        log.info("resuming from %s at step %d", ckpt.name, start)
    # ---------------- data (scanned and cached once, here) ----------------
    data = _load_site_data(recipe, data_dirs, run)
    recipe = resolve_steps_per_epoch(recipe, data)
    total = total or recipe.ssl.epochs * recipe.ssl.steps_per_epoch
    end = total if steps is None else steps
    job = _Job(recipe, run, start, total, end, state, privacy, runtime, progress)
    if runtime.workers == 1:
        return _train(job, data)
    _check_data_parallel(recipe, privacy, runtime)
    summary_file = run / "work" / "last_run.json"
    summary_file.unlink(missing_ok=True)
    distributed.launch(_train_worker, (job,), runtime.workers,
                       device=runtime.torch_device(), threads=recipe.ssl.threads)
    return json.loads(summary_file.read_text())


def _check_data_parallel(recipe: Recipe, privacy: PrivacyConfig | None, runtime: Runtime) -> None:
    if privacy is not None:
        raise ValueError(f"--nproc {runtime.workers}: differential privacy trains in one process "
                         "(one Poisson sample and one noise draw per step); use --nproc 1")
    need = runtime.workers * recipe.ssl.accumulate
    for name in ("batch_size_2d", "batch_size_3d"):
        if getattr(recipe.ssl, name) < need:
            raise ValueError(f"ssl.{name}: {getattr(recipe.ssl, name)} is smaller than workers x "
                             f"accumulate = {need}; every process needs at least one item per "
                             "micro-batch")


def _train_worker(job: _Job) -> None:
    """One data-parallel process: the same loop on this rank's shards (rank 0 logs and saves)."""
    from fed_unimiss.data.cache import SiteIndex

    data = SiteData.from_index(SiteIndex.load(job.run / "work"))
    summary = _train(job, data)
    if distributed.rank() == 0:
        atomic_write_json(job.run / "work" / "last_run.json", summary)


def _train(job: _Job, data: SiteData) -> dict[str, Any]:
    """The training loop of one process: steps [start, end), checkpoint every interval."""
    recipe, run, runtime = job.recipe, job.run, job.runtime
    lead = distributed.rank() == 0
    torch.set_num_threads(recipe.ssl.threads)
    device = runtime.torch_device(distributed.rank())
    every = recipe.ssl.checkpoint_every
    privacy = job.privacy
    if privacy is not None:
        privacy = with_planned_intervals(privacy, job.total, every)
    gradient_step, guard = training_mode(recipe, privacy, run / "state", data, every)
    engine = SelfDistillation(recipe, total_steps=job.total, device=device,
                              gradient_step=gradient_step, precision=runtime.precision)
    if job.state is not None:
        engine.load_state_dict(job.state)
    log.info("training on %s in %s with %d process(es)", device, runtime.precision,
             distributed.world_size())
    # ---------------- train ----------------
    stats_total: dict[str, Any] = {"steps": 0, "samples_2d": 0, "samples_3d": 0, "skipped": 0,
                                   "seconds": 0.0}
    step, end = job.start, job.end
    with _progress(job.progress and lead) as bar:
        task = bar.add_task("pretrain", total=max(end - step, 0), loss=float("nan"), phase="",
                            rate="")
        logger = _Logger(run, engine, bar, task) if lead else None
        if logger is not None:
            logger.end_step = end
        try:
            while step < end:
                chunk_end = min(end, (step // every + 1) * every)
                # the ledger (if any) is persisted before the checkpoint is released
                local = run_local(engine, data, step, chunk_end - step, guard,
                                  interval=step // every + 1, on_step=logger)
                if local.stats is None:
                    log.warning("stopping at step %d: %s", step, local.refusal)
                    stats_total["refused"] = local.refusal
                    break
                st = local.stats
                if EPSILON in local.public:
                    stats_total["epsilon"] = local.public[EPSILON]
                # the loss both the checkpoint line and the final summary show: the mean over
                # the steps of this checkpoint interval (the last logged step alone is noisier)
                stats_total["interval_loss"] = {"from": step, "to": chunk_end, "loss": st.loss}
                step = chunk_end
                for k in ("steps", "samples_2d", "samples_3d", "skipped", "seconds"):
                    stats_total[k] += getattr(st, k)
                bar.update(task, rate=f"{st.samples_per_s:.1f} samples/s")
                if lead:
                    path = save_checkpoint(run, f"{CHECKPOINT_PREFIX}{step:08d}",
                                           engine.state_dict(),
                                           checkpoint_meta(engine, step, data, logger.last))
                    log.info("checkpoint %s (mean loss of steps %d..%d: %.4f)", path.name,
                             stats_total["interval_loss"]["from"], step - 1, st.loss)
        finally:
            if logger is not None:
                logger.close()
    return {**stats_total, "start_step": job.start, "end_step": step, "total_steps": job.total,
            "last": logger.last if logger else None, "data": data.summary,
            "device": str(device), "precision": runtime.precision,
            "world_size": distributed.world_size()}
