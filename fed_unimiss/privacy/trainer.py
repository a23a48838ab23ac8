"""``DPSelfDistillation``: the self-distillation engine with DP-SGD on the student.

It is :class:`fed_unimiss.ssl.engine.SelfDistillation` (same student, EMA teacher, DINO loss,
AdamW groups, schedules, views, exchanged state) with one step replaced:

1. Poisson-sample *patients* with rate q (:class:`~fed_unimiss.privacy.sampling.PatientPoissonSampler`),
   one item per sampled patient, from a generator seeded by a site-local secret (the sample and
   the noise must be unpredictable to the aggregator, who knows the recipe seed);
2. make that item's two views (the usual seeded augmentations), run the teacher batched and
   without gradients;
3. per patient, the whole step loss (2 views; for CT also the slices and all four UniMiSS terms)
   is one row of per-sample gradients (:func:`~fed_unimiss.privacy.dp_sgd.per_sample_gradients`);
4. each row is clipped to ``max_grad_norm`` (linear layers ghost-clipped, never materialised
   where that is cheaper), summed; Opacus adds N(0, (sigma C)^2) and divides by
   the expected batch q x patients; AdamW steps; the head's last layer, a plain Linear under DP,
   is renormalised (post-processing); the teacher EMA follows (post-processing);
5. the DINO center is either kept as received ("frozen", no privacy cost) or moved by a clipped,
   noised mean of per-patient teacher logits ("gaussian", accounted in the ledger).

Everything the step computes from private data and that outlives it goes through step 4 or 5.
The per-step metrics (losses of sampled patients, batch sizes) stay in the site's log;
:func:`public_train_metrics` is what may leave the site.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fed_unimiss.ssl.config import Recipe
from fed_unimiss.ssl.engine import SelfDistillation, TrainStats
from fed_unimiss.ssl.schedules import Phase
from fed_unimiss.ssl.site_data import SiteData
from fed_unimiss.ssl.steps import slice_logits
from fed_unimiss.ssl.views import ct_views, step_generator, xray_views

from .config import CENTER_GAUSSIAN, PrivacyConfig
from .dp_sgd import DPSGD, linear_layers, noised_mean
from .sampling import PatientPoissonSampler, sample_rate_for

__all__ = ["DPSelfDistillation", "check_dp_recipe", "site_sample_rate", "public_train_metrics"]

log = logging.getLogger(__name__)


def check_dp_recipe(recipe: Recipe) -> None:
    """Raise ``ValueError`` if the recipe's model cannot be trained with DP-SGD."""
    if recipe.model.head_weight_norm:
        raise ValueError(
            "model.head_weight_norm: DP training needs a plain last head layer (Opacus cannot "
            "clip per-sample gradients through weight norm); set head_weight_norm: false in "
            "the recipe's model section (every site of the federation must use the same model)"
        )
    if recipe.ssl.teacher_centering != "center":
        raise ValueError(
            f"ssl.teacher_centering: DP training needs 'center', got "
            f"{recipe.ssl.teacher_centering!r} (Sinkhorn-Knopp targets mix the samples of a batch "
            "and are uniform for the one-patient rows DP-SGD computes)"
        )
    if recipe.ssl.koleo_weight > 0:
        raise ValueError(
            f"ssl.koleo_weight: DP training needs 0, got {recipe.ssl.koleo_weight} (KoLeo "
            "compares the patients of a batch, so one patient's gradient row would depend on "
            "others'); set ssl.koleo_weight: 0 in the recipe or the federation's recipe_overrides"
        )


def _patients(data: SiteData) -> dict[str, list[str]]:
    """Patient key of every item, per kind of data ("2d": X-rays, "3d": CT tiles)."""
    out: dict[str, list[str]] = {}
    for kind, ds in (("2d", data.xray), ("3d", data.ct)):
        if ds is None:
            continue
        keys = ds.groups() if hasattr(ds, "groups") else None
        if keys is None or len(keys) != len(ds):
            raise ValueError(
                f"the {kind} dataset does not provide one patient key per item (groups()); "
                "patient-level DP needs it"
            )
        out[kind] = [str(k) for k in keys]
    return out


def _num_patients(groups: dict[str, list[str]]) -> int:
    return len({key for keys in groups.values() for key in keys})


def site_sample_rate(privacy: PrivacyConfig, data: SiteData) -> float:
    """The Poisson rate q of this site: expected patients per step / patients at the site."""
    return sample_rate_for(privacy.patients_per_step, _num_patients(_patients(data)))


def public_train_metrics(privacy: PrivacyConfig, stats: TrainStats, view_depth: int,
                         steps_2d: int, steps_3d: int) -> dict[str, float]:
    """Counts a DP site may release: functions of the public schedule and config only.

    The actual Poisson batch sizes, losses and timings are computed from private data without
    noise, so they stay in the site log; the aggregator's sample weights use the *expected*
    patients per step instead.
    """
    per_step = float(privacy.patients_per_step)
    return {
        "samples_2d": per_step * (steps_2d + steps_3d * view_depth),
        "samples_3d": per_step * steps_3d,
        "steps": float(stats.steps),
    }


class DPSelfDistillation(SelfDistillation):
    """:class:`SelfDistillation` whose student trains with patient-level DP-SGD.

    Args:
        recipe: the recipe (``model.head_weight_norm`` must be false).
        total_steps: schedule length, as for the plain engine.
        privacy: the site's privacy settings.
        noise_multiplier: sigma from the site's ledger (:meth:`PrivacyLedger.plan`).
        dp_seed: seeds patient sampling and noise; None (always, outside tests) draws a secret.
    """

    def __init__(self, recipe: Recipe, total_steps: int, privacy: PrivacyConfig,
                 noise_multiplier: float, device: str | torch.device = "cpu",
                 dp_seed: int | None = None) -> None:
        check_dp_recipe(recipe)
        privacy.validate()
        super().__init__(recipe, total_steps, device)
        self.privacy = privacy
        self.noise_multiplier = float(noise_multiplier)
        seed = secrets.randbits(63) if dp_seed is None else int(dp_seed)
        self._dp_gen = torch.Generator().manual_seed(seed)
        self._noise_gen = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
        self._names_last = [n for n, _ in self.student.named_parameters()
                            if n.startswith("head.last_layer.")]

    # ------------------------------------------------------------------ one DP step
    def _dp_batch(self, data: SiteData, sampler: PatientPoissonSampler, phase: Phase,
                  step: int) -> tuple[Tensor | None, int]:
        """Views of the sampled patients stacked as (B, 2, C, ...), or None for an empty batch."""
        idx = sampler.sample(phase, self._dp_gen)
        items, skipped = data.load(phase, idx, min_depth=self.cfg.view_depth)
        make = xray_views if phase == "2d" else ct_views
        rows = []
        for j, item in enumerate(items):
            try:
                rows.append(torch.stack(make(item, step_generator(self.cfg.seed, "dp-views",
                                                                  step, j), self.cfg)))
            except ValueError as e:
                log.warning("skipping %s item of step %d: %s", phase, step, e)
                skipped += 1
        if not rows:
            return None, skipped
        return torch.stack(rows).to(self.device), skipped

    def _teacher_targets(self, phase: Phase, views: Tensor) -> list[Tensor]:
        """Teacher logits per patient: [(B, 2, K)] (2D) or [vol (B, 2, K), slices (B, 2, K)]."""
        b, v = views.shape[:2]
        flat = views.reshape(b * v, *views.shape[2:])  # view-major rows of every patient
        with torch.no_grad():
            out = [self.teacher(flat).view(b, v, -1)]
            if phase == "3d":
                out.append(slice_logits(self.teacher, flat).view(b, v, -1))
        return out

    def _patient_loss(self, phase: Phase) -> Callable[..., Tensor]:
        """One patient's whole step loss: the function whose gradient is one DP row."""
        loss_fn = self.loss_fn

        def xray(forward: Callable[[Tensor], Tensor], views: Tensor, t: Tensor) -> Tensor:
            s = [forward(views[i:i + 1]) for i in range(views.shape[0])]  # (1, K) each
            return loss_fn(s, [t[i:i + 1] for i in range(t.shape[0])], update_center=False)

        def ct(forward: Callable[[Tensor], Tensor], views: Tensor, t_vol: Tensor,
               t_slc: Tensor) -> Tensor:
            n = views.shape[0]
            s_vol = [forward(views[i:i + 1]) for i in range(n)]
            s_slc = [slice_logits(forward, views[i:i + 1]) for i in range(n)]
            tv = [t_vol[i:i + 1] for i in range(n)]
            ts = [t_slc[i:i + 1] for i in range(n)]
            return (loss_fn(s_vol, tv, update_center=False)
                    + loss_fn(s_slc, tv, update_center=False)
                    + loss_fn(s_slc, ts, update_center=False)
                    + loss_fn(s_vol, ts, update_center=False))

        return xray if phase == "2d" else ct

    def _set_dp_hyperparameters(self, step: int, phase: Phase) -> None:
        self._set_hyperparameters(step, phase)
        if self.schedules.last_layer_frozen(step):  # lr 0 instead of zeroed grads (noise)
            for group in self.optimizer.param_groups:
                if group.get("name") == "last_layer":
                    group["lr"] = 0.0
                    group["weight_decay"] = 0.0
        frozen_3d = phase == "2d"  # X-ray steps: 3D tensors neither clipped, noised nor moved
        for name in self._names_3d:
            self._params[name].requires_grad_(not frozen_3d)

    @torch.no_grad()
    def _update_center(self, targets: list[Tensor], batch: int, expected: float) -> None:
        if self.privacy.center != CENTER_GAUSSIAN:
            return  # "frozen": the center received from the aggregator is kept as is
        k = self.loss_fn.center.shape[1]
        if batch:
            rows = torch.cat([t.reshape(batch, -1, k) for t in targets], dim=1).mean(dim=1)
        else:
            rows = self.loss_fn.center.new_zeros((0, k))
        mean = noised_mean(rows, self.privacy.center_clip, self.noise_multiplier, expected,
                           self._noise_gen)
        m = self.loss_fn.center_momentum
        self.loss_fn.center.mul_(m).add_(mean.to(self.loss_fn.center) * (1 - m))

    # ------------------------------------------------------------------ public loop
    def train_steps(self, data: SiteData, start_step: int, num_steps: int, *,
                    on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainStats:
        """Global steps [start_step, start_step + num_steps) with DP-SGD.

        Every step is a DP step, including those whose Poisson sample is empty (they apply
        noise only), so the ledger's ``num_steps`` is exactly the number of noisy releases.
        """
        if start_step < 0 or num_steps < 0:
            raise ValueError(f"start_step and num_steps must be >= 0, got {start_step}, "
                             f"{num_steps}")
        groups = _patients(data)
        num_patients = _num_patients(groups)
        q = sample_rate_for(self.privacy.patients_per_step, num_patients)
        sampler = PatientPoissonSampler(groups, q)
        expected = q * num_patients
        dp = DPSGD(self.student, self.optimizer, self.noise_multiplier,
                   self.privacy.max_grad_norm, expected, self._noise_gen,
                   self.privacy.secure_mode, ghost=linear_layers(self.student))
        stats = TrainStats()
        self.student.train()
        self.teacher.train()
        losses: list[float] = []
        t0 = time.perf_counter()
        try:
            for step in range(start_step, start_step + num_steps):
                phase = self.schedules.phase(step, data.has_2d, data.has_3d)
                views, skipped = self._dp_batch(data, sampler, phase, step)
                stats.skipped += skipped
                b = 0 if views is None else views.shape[0]
                self._set_dp_hyperparameters(step, phase)
                targets = [] if views is None else self._teacher_targets(phase, views)
                inputs = [] if views is None else [views, *targets]
                row_losses = dp.step(self._patient_loss(phase), inputs, b)
                self.student.head.renormalize_last_layer()
                self._update_center(targets, b, expected)
                self._update_teacher(step)
                stats.steps += 1
                if b:
                    value = float(row_losses.mean())
                    if not math.isfinite(value):
                        raise FloatingPointError(f"non-finite loss ({value}) at global step "
                                                 f"{step} ({phase} DP step)")
                    losses.append(value)
                    if phase == "2d":
                        stats.samples_2d += b
                    else:
                        stats.samples_3d += b
                        stats.samples_2d += b * self.cfg.view_depth
                else:
                    stats.empty_batches += 1
                metrics = {"step": step, "phase": phase, "batch": b, "skipped": skipped,
                           "loss": losses[-1] if b else float("nan"),
                           "lr": self.optimizer.param_groups[0]["lr"]}
                stats.history.append(metrics)
                if on_step is not None:
                    on_step(metrics)
        finally:
            for name in self._names_3d:
                self._params[name].requires_grad_(True)
        stats.seconds = time.perf_counter() - t0
        if losses:
            stats.loss = sum(losses) / len(losses)
        n = stats.samples_3d + (stats.samples_2d - stats.samples_3d * self.cfg.view_depth)
        stats.samples_per_s = n / stats.seconds if stats.seconds > 0 else 0.0
        return stats

    def phase_counts(self, data: SiteData, start_step: int, num_steps: int) -> tuple[int, int]:
        """(2D steps, 3D steps) in the range: public, from the schedule alone."""
        phases = [self.schedules.phase(s, data.has_2d, data.has_3d)
                  for s in range(start_step, start_step + num_steps)]
        return phases.count("2d"), phases.count("3d")


