"""``SelfDistillation``: the one self-distillation trainer, used by centralized pretraining and by
the federated site client alike, with or without differential privacy.

It owns a student and an EMA teacher (UniMiSSNet each), the DINO loss with its shared center, and
AdamW with three parameter groups (decay / no decay / head last layer). ``train_steps`` runs a
range of GLOBAL steps; every schedule value, the 2D/3D phase, the batch and the views of a step
are functions of (recipe, global step), so training can stop after any step and resume exactly.
How a step turns its batch into an update is the engine's :class:`GradientStep`: plain DINO
(:class:`PlainStep`, the default) or patient-level DP-SGD (:class:`fed_unimiss.ssl.dp_step.DPStep`).

Where it computes is the caller's :class:`~fed_unimiss.runtime.Runtime`: every tensor the engine
creates lives on its device; ``bf16``/``fp16`` autocast the forward passes while the weights,
AdamW's state, the EMA teacher and the center stay fp32. When a torch.distributed process group
exists, each process takes its shard of every global batch and the processes average their
gradients and the center (:mod:`fed_unimiss.ssl.distributed`), so they train one model.

Exchanged state (what a site sends and receives, docs/architecture.md): ``student.<name>``,
``teacher.<name>`` for every state-dict entry of each network, and ``center`` (1, out_dim).
Full checkpoints (:meth:`state_dict`) add the AdamW state as ``optim.<param name>.<key>``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fed_unimiss.exchange import CENTER_KEY, STUDENT_PREFIX, TEACHER_PREFIX
from fed_unimiss.models import UniMiSSNet, dimension_of
from fed_unimiss.models.classify import DIM_3D
from fed_unimiss.optim import decay_groups
from fed_unimiss.runtime import autocast_dtype, grad_scaler
from fed_unimiss.ssl import distributed
from fed_unimiss.ssl.batches import Batch, stream_batch
from fed_unimiss.ssl.config import Recipe
from fed_unimiss.ssl.dino_loss import DINOLoss
from fed_unimiss.ssl.gradient_step import GradientStep, PlainStep
from fed_unimiss.ssl.schedules import Phase, Schedules, phase_steps_before
from fed_unimiss.ssl.site_data import SiteData
from fed_unimiss.ssl.step_context import StepContext
from fed_unimiss.ssl.steps import StepOutput
from fed_unimiss.ssl.train_stats import TrainStats

__all__ = ["SelfDistillation", "TrainStats", "param_groups"]

log = logging.getLogger(__name__)

OPTIM_PREFIX = "optim."
LAST_LAYER_PREFIX = "head.last_layer."


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: ``decay`` (ndim > 1), ``no_decay`` (biases, norms, 1-D), ``last_layer``.

    The split is :func:`fed_unimiss.optim.decay_groups` with the head's last layer apart (DINO
    freezes it for the first epoch). Weight decay is set per step from the schedule; each group
    records its parameter names so optimizer state can be saved by name.
    """
    groups = decay_groups(model, apart=LAST_LAYER_PREFIX, apart_name="last_layer")
    for group in groups:
        group["weight_decay"] = 0.0
    return groups


class SelfDistillation:
    """Student + EMA teacher + DINO loss + AdamW for a recipe and a planned run length.

    Args:
        recipe: resolved recipe; ``recipe.ssl.steps_per_epoch`` must be set.
        total_steps: length of the whole run in global steps (all rounds, for a federation);
            the cosine schedules span it.
        device: torch device (resolve a setting with :func:`fed_unimiss.runtime.resolve_device`).
        gradient_step: how a step becomes an update; :class:`PlainStep` when None.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast of the forward passes).
    """

    def __init__(self, recipe: Recipe, total_steps: int, device: str | torch.device = "cpu",
                 gradient_step: GradientStep | None = None, precision: str = "fp32"):
        self.gradient_step: GradientStep = gradient_step or PlainStep()
        self.gradient_step.check_recipe(recipe)
        autocast_dtype(precision)  # validates the name
        if precision != "fp32" and not self.gradient_step.mixed_precision:
            raise ValueError(f"precision {precision}: {type(self.gradient_step).__name__} "
                             "trains in fp32 only (per-sample gradients are clipped and noised "
                             "in full precision); use precision fp32")
        if distributed.world_size() > 1 and not self.gradient_step.data_parallel:
            raise ValueError(f"{type(self.gradient_step).__name__} runs in one process only "
                             "(its sampling and noise are drawn once per step); use 1 worker")
        self.recipe = recipe
        self.cfg = recipe.ssl
        self.device = torch.device(device)
        self.precision = precision
        self.scaler = grad_scaler(self.device, precision)
        self.schedules = Schedules.from_config(recipe.ssl, total_steps)
        torch.manual_seed(recipe.ssl.seed)  # same seed -> same initial student at every site
        # ---- student and teacher (teacher = copy of the student, no gradients) ----
        self.student = UniMiSSNet(recipe.model).to(self.device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)  # there is no backpropagation through the teacher
        # ---- loss with the shared center ----
        self.loss_fn = DINOLoss(recipe.model.head_out_dim, recipe.ssl.student_temp,
                                recipe.ssl.teacher_temp, recipe.ssl.center_momentum,
                                centering=recipe.ssl.teacher_centering).to(self.device)
        # ---- optimizer ----
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=0.0, weight_decay=0.0)
        self._names_3d = [n for n, _ in self.student.named_parameters() if dimension_of(n) == DIM_3D]
        self._params = dict(self.student.named_parameters())

    # ------------------------------------------------------------------ exchanged state
    def exchange_state(self) -> dict[str, Tensor]:
        """``student.*``, ``teacher.*`` and ``center``, detached CPU float tensors."""
        out = {f"{STUDENT_PREFIX}{k}": v.detach().cpu()
               for k, v in self.student.state_dict().items()}
        out.update({f"{TEACHER_PREFIX}{k}": v.detach().cpu()
                    for k, v in self.teacher.state_dict().items()})
        out[CENTER_KEY] = self.loss_fn.center.detach().cpu().clone()
        return out

    def load_exchange_state(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Load what :meth:`exchange_state` produced (e.g. the aggregated global model).

        Raises ``ValueError`` listing missing and unexpected keys (when ``strict``) and any shape
        mismatch (always); nothing is loaded if the check fails.
        """
        expected = {k: v.shape for k, v in self.exchange_state().items()}
        state = {k: v for k, v in state.items() if not k.startswith(OPTIM_PREFIX)}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [f"{k}: expected {tuple(expected[k])}, got {tuple(state[k].shape)}"
                  for k in sorted(set(state) & set(expected))
                  if tuple(state[k].shape) != tuple(expected[k])]
        problems = []
        if strict and missing:
            problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}"
                            + (" ..." if len(missing) > 10 else ""))
        if strict and unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
                            + (" ..." if len(unexpected) > 10 else ""))
        if shapes:
            problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:10])}")
        if problems:
            raise ValueError("cannot load self-distillation state: " + " | ".join(problems))
        with torch.no_grad():
            for prefix, net in ((STUDENT_PREFIX, self.student), (TEACHER_PREFIX, self.teacher)):
                sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                net.load_state_dict(sub, strict=strict)
            if CENTER_KEY in state:
                self.loss_fn.center.copy_(state[CENTER_KEY].to(self.loss_fn.center))

    # ------------------------------------------------------------------ full checkpoints
    def optimizer_state_tensors(self) -> dict[str, Tensor]:
        """AdamW state as ``optim.<param name>.<key>`` tensors (safetensors-able, by name)."""
        out = {}
        for name, p in self._params.items():
            for key, value in self.optimizer.state.get(p, {}).items():
                t = value if isinstance(value, Tensor) else torch.tensor(float(value))
                out[f"{OPTIM_PREFIX}{name}.{key}"] = t.detach().cpu().clone()
        return out

    def load_optimizer_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`optimizer_state_tensors`; unknown parameter names are an error."""
        per_param: dict[str, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if not k.startswith(OPTIM_PREFIX):
                continue
            name, key = k[len(OPTIM_PREFIX):].rsplit(".", 1)
            if name not in self._params:
                raise ValueError(f"optimizer state for unknown parameter {name!r}")
            per_param.setdefault(name, {})[key] = v
        self.optimizer.state.clear()
        for name, st in per_param.items():
            p = self._params[name]
            self.optimizer.state[p] = {
                k: (v.clone() if k == "step" else v.to(p.device, p.dtype).clone())
                for k, v in st.items()}

    def state_dict(self) -> dict[str, Tensor]:
        """Exchange state plus optimizer state: everything needed to resume pretraining."""
        return {**self.exchange_state(), **self.optimizer_state_tensors()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.load_exchange_state(state, strict=True)
        self.load_optimizer_state_tensors(state)

    # ------------------------------------------------------------------ one step
    def step_context(self) -> StepContext:
        """What the gradient step works with, built afresh so a replaced scaler is seen."""
        return StepContext(student=self.student, teacher=self.teacher, loss_fn=self.loss_fn,
                           optimizer=self.optimizer, scaler=self.scaler,
                           schedules=self.schedules, cfg=self.cfg, device=self.device,
                           precision=self.precision, params_3d=self.params_3d())

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The forward's mixed-precision context (a no-op in fp32)."""
        return self.step_context().autocast()

    def batch_at(self, data: SiteData, phase: Phase, position: int, tag: str,
                 step: int) -> Batch:
        """Two stacked views of this process's shard of the batch at ``position`` of ``phase``
        (:func:`fed_unimiss.ssl.batches.stream_batch`)."""
        return stream_batch(data, phase, position, tag, step, self.cfg, self.device)

    def params_3d(self) -> list[torch.nn.Parameter]:
        """The student's 3D-specific parameters (they sit out the X-ray steps)."""
        return [self._params[name] for name in self._names_3d]

    def _set_hyperparameters(self, step: int, phase: Phase) -> None:
        lr = self.schedules.lr_at(step, phase)
        wd = self.schedules.weight_decay_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["decays"] else 0.0

    def step_loss(self, phase: Phase, views: list[Tensor], update_center: bool = True,
                  teacher_out: list[Tensor] | None = None) -> StepOutput:
        """The batch loss of one plain step (:mod:`fed_unimiss.ssl.steps`)."""
        return self.step_context().step_loss(phase, views, update_center, teacher_out)

    @torch.no_grad()
    def _update_teacher(self, step: int) -> None:
        m = self.schedules.momentum_at(step)
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        for bs, bt in zip(self.student.buffers(), self.teacher.buffers(), strict=True):
            bt.copy_(bs)

    # ------------------------------------------------------------------ public loops
    def train_steps(self, data: SiteData, start_step: int, num_steps: int, *,
                    on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainStats:
        """Run global steps [start_step, start_step + num_steps) on ``data``.

        Raises ``FloatingPointError`` naming the step if the loss is not finite.
        """
        if start_step < 0 or num_steps < 0:
            raise ValueError(f"start_step and num_steps must be >= 0, got {start_step}, "
                             f"{num_steps}")
        stats = TrainStats()
        self.student.train()
        self.teacher.train()
        grad_step, ctx = self.gradient_step, self.step_context()
        losses, view_samples, t0 = [], 0, time.perf_counter()
        grad_step.begin(ctx, data)
        try:
            for step in range(start_step, start_step + num_steps):
                t_step = time.perf_counter()
                phase = self.schedules.phase(step, data.has_2d, data.has_3d)
                position = phase_steps_before(step, phase, self.schedules.steps_per_epoch,
                                              self.cfg.alternate_interval, data.has_2d,
                                              data.has_3d)
                batch = grad_step.batch(ctx, data, phase, position, step)
                stats.skipped += batch.skipped
                # every process must take the same steps and micro-batches (they meet in
                # collectives), so a shard too small for its micro-batches skips the step for all
                sizes = distributed.agree_on_sizes(batch.size, self.device)
                batch.total = sum(sizes)
                if len(sizes) > 1 and batch.size and min(sizes) < self.cfg.accumulate:
                    log.warning("step %d: a data-parallel shard has fewer than %d usable %s "
                                "item(s); every process skips the step", step,
                                self.cfg.accumulate, phase)
                    batch = Batch(None, 0, batch.skipped)
                n = batch.size
                if not n:
                    stats.empty_batches += 1
                    if not grad_step.steps_on_empty:
                        log.warning("step %d: every item of the %s batch was unusable; step "
                                    "skipped", step, phase)
                        continue
                self._set_hyperparameters(step, phase)
                result = grad_step.update(ctx, step, phase, batch)
                self._update_teacher(step)
                # ---- bookkeeping ----
                stats.steps += 1
                if n:
                    losses.append(result.loss)
                n_all = batch.total or n  # every process's items (= n in one process)
                if phase == "2d":
                    stats.samples_2d += n_all
                else:
                    stats.samples_3d += n_all
                    stats.samples_2d += n_all * self.cfg.view_depth  # each sub-volume's slices
                view_samples += n_all
                seconds = time.perf_counter() - t_step
                metrics = {"step": step, "phase": phase, "loss": result.loss, **result.parts,
                           "lr": self.optimizer.param_groups[0]["lr"],
                           "weight_decay": self.schedules.weight_decay_at(step),
                           "momentum": self.schedules.momentum_at(step), "batch": n_all,
                           "skipped": batch.skipped, "world_size": distributed.world_size(),
                           "samples_per_s": n_all / seconds if seconds > 0 else 0.0}
                if result.collapse is not None:
                    c = result.collapse
                    metrics.update(teacher_entropy=c.teacher_entropy,
                                   batch_entropy=c.batch_entropy, kl=c.kl)
                stats.history.append(metrics)
                if on_step is not None:
                    on_step(metrics)
        finally:
            grad_step.end(ctx)
        stats.seconds = time.perf_counter() - t0
        if losses:
            stats.loss = sum(losses) / len(losses)
            for phase in ("2d", "3d"):
                kind = [h["loss"] for h in stats.history
                        if h["phase"] == phase and math.isfinite(h["loss"])]
                if kind:
                    setattr(stats, f"loss_{phase}", sum(kind) / len(kind))
            last = stats.history[-1]
            stats.teacher_entropy = last.get("teacher_entropy", float("nan"))
            stats.batch_entropy = last.get("batch_entropy", float("nan"))
            stats.kl = last.get("kl", float("nan"))
        stats.samples_per_s = view_samples / stats.seconds if stats.seconds > 0 else 0.0
        return stats

    def public_metrics(self, data: SiteData, start_step: int, num_steps: int,
                       stats: TrainStats) -> dict[str, float]:
        """What of a ``train_steps`` call may leave the site; the gradient step decides."""
        return self.gradient_step.public_metrics(self.step_context(), data, start_step,
                                                 num_steps, stats)

    @torch.no_grad()
    def evaluate(self, data: SiteData, max_batches: int) -> dict[str, float]:
        """Self-distillation loss of the current model on local data; updates nothing.

        Uses up to ``max_batches`` fixed evaluation batches per kind of data (the first batches of
        the seeded order, with views seeded separately from training), no center update.
        """
        center = self.loss_fn.center.clone()
        result: dict[str, float] = {"skipped": 0.0}
        all_losses = []
        for phase in ("2d", "3d"):
            if (phase == "2d" and not data.has_2d) or (phase == "3d" and not data.has_3d):
                continue
            losses, stats_list = [], []
            for b in range(max_batches):
                batch = self.batch_at(data, phase, b, "eval-views", b)
                result["skipped"] += batch.skipped
                if batch.views is None:
                    continue
                out = self.step_loss(phase, batch.views, update_center=False)
                losses.append(float(out.loss))
                stats_list.append(out.collapse)
            if losses:
                result[f"loss_{phase}"] = sum(losses) / len(losses)
                result[f"teacher_entropy_{phase}"] = stats_list[-1].teacher_entropy
                result[f"kl_{phase}"] = stats_list[-1].kl
                all_losses += losses
        if not torch.equal(center, self.loss_fn.center):  # evaluation must not move the center
            raise RuntimeError("evaluate() changed the DINO center; this is a bug")
        result["loss"] = sum(all_losses) / len(all_losses) if all_losses else float("nan")
        result["batches"] = float(len(all_losses))
        return result
