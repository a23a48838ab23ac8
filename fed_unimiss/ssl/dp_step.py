"""``DPStep``: patient-level DP-SGD as the engine's gradient step.

Plugged into :class:`~fed_unimiss.ssl.engine.SelfDistillation` (same student, EMA teacher, DINO
loss, AdamW groups, schedules, views and exchanged state), one step is:

1. Poisson-sample *patients* with rate q (:class:`~fed_unimiss.privacy.PatientPoissonSampler`),
   one item per sampled patient, from a generator seeded by a site-local secret (the sample and
   the noise must be unpredictable to the aggregator, who knows the recipe seed);
2. make that item's two views (the usual seeded augmentations), run the teacher batched and
   without gradients;
3. per patient, the whole step loss (:func:`~fed_unimiss.ssl.steps.patient_step_loss`: 2 views;
   for CT also the slices and all four UniMiSS terms) is one row of per-sample gradients;
4. each row is clipped to ``max_grad_norm`` (linear layers ghost-clipped where that is cheaper),
   summed; Opacus adds N(0, (sigma C)^2) and divides by the expected batch q x patients; AdamW
   steps; the head's last layer, a plain Linear under DP, is renormalised (post-processing); the
   engine's teacher EMA follows (post-processing);
5. the DINO center is either kept as received ("frozen", no privacy cost) or moved by a clipped,
   noised mean of per-patient teacher logits ("gaussian", accounted in the ledger).

Everything the step computes from private data and that outlives it goes through step 4 or 5.
The per-step metrics (losses of sampled patients, batch sizes) stay in the site's log;
:meth:`DPStep.public_metrics` is what may leave the site.
"""

from __future__ import annotations

import logging
import secrets

import torch
from torch import Tensor

from fed_unimiss import exchange as ex
from fed_unimiss.privacy.config import CENTER_GAUSSIAN, PrivacyConfig
from fed_unimiss.privacy.dp_sgd import DPSGD, linear_layers, noised_mean
from fed_unimiss.privacy.sampling import PatientPoissonSampler, sample_rate_for
from fed_unimiss.ssl.batches import Batch, item_views
from fed_unimiss.ssl.config import Recipe
from fed_unimiss.ssl.gradient_step import StepResult, check_finite
from fed_unimiss.ssl.schedules import Phase
from fed_unimiss.ssl.site_data import SiteData
from fed_unimiss.ssl.step_context import StepContext
from fed_unimiss.ssl.steps import patient_step_loss, per_sample_teacher_logits
from fed_unimiss.ssl.train_stats import TrainStats

__all__ = ["DPStep", "check_dp_recipe", "site_sample_rate"]

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


class DPStep:
    """Patient-level DP-SGD on the student (see the module docstring).

    Args:
        privacy: the site's privacy settings.
        noise_multiplier: sigma from the site's ledger (:meth:`PrivacyLedger.plan`).
        dp_seed: seeds patient sampling and noise; None (always, outside tests) draws a secret.
    """

    steps_on_empty = True  # an empty Poisson sample still takes a noisy step
    mixed_precision = False  # per-patient gradients are clipped and noised in fp32
    data_parallel = False    # one Poisson sample and one noise draw per step

    def __init__(self, privacy: PrivacyConfig, noise_multiplier: float,
                 dp_seed: int | None = None) -> None:
        privacy.validate()
        self.privacy = privacy
        self.noise_multiplier = float(noise_multiplier)
        seed = secrets.randbits(63) if dp_seed is None else int(dp_seed)
        self._dp_gen = torch.Generator().manual_seed(seed)
        self._noise_seed = seed ^ 0x5DEECE66D
        self._noise_gen: torch.Generator | None = None  # made on the context's device in begin()
        self._sampler: PatientPoissonSampler | None = None
        self._dp: DPSGD | None = None
        self._expected = 0.0

    def check_recipe(self, recipe: Recipe) -> None:
        check_dp_recipe(recipe)

    # ------------------------------------------------------------------ hooks
    def begin(self, ctx: StepContext, data: SiteData) -> None:
        groups = _patients(data)
        num_patients = _num_patients(groups)
        q = sample_rate_for(self.privacy.patients_per_step, num_patients)
        self._sampler = PatientPoissonSampler(groups, q)
        self._expected = q * num_patients
        if self._noise_gen is None or self._noise_gen.device != ctx.device:
            # Opacus draws the gradient noise on the parameters' device, from this generator
            self._noise_gen = torch.Generator(device=ctx.device).manual_seed(self._noise_seed)
        self._dp = DPSGD(ctx.student, ctx.optimizer, self.noise_multiplier,
                         self.privacy.max_grad_norm, self._expected, self._noise_gen,
                         self.privacy.secure_mode, ghost=linear_layers(ctx.student))

    def end(self, ctx: StepContext) -> None:
        for p in ctx.params_3d:
            p.requires_grad_(True)

    def batch(self, ctx: StepContext, data: SiteData, phase: Phase, position: int,
              step: int) -> Batch:
        """Views of the sampled patients stacked as (B, 2, C, ...); ``position`` is unused."""
        idx = self._require_sampler().sample(phase, self._dp_gen)
        items, skipped = data.load(phase, idx, min_depth=ctx.cfg.view_depth)
        per_sample, bad = item_views(items, list(range(len(items))), phase, ctx.cfg,
                                     "dp-views", step)
        if not per_sample:
            return Batch(None, 0, skipped + bad)
        views = torch.stack([torch.stack(v) for v in per_sample]).to(ctx.device)
        return Batch(views, len(per_sample), skipped + bad)

    def update(self, ctx: StepContext, step: int, phase: Phase, batch: Batch
               ) -> StepResult:
        self._freeze(ctx, step, phase)
        views, b = batch.views, batch.size
        targets = [] if views is None else per_sample_teacher_logits(ctx.teacher, phase, views)
        inputs = [] if views is None else [views, *targets]
        dp = self._dp
        if dp is None:
            raise RuntimeError("DPStep.update() before begin()")
        row_losses = dp.step(patient_step_loss(ctx.loss_fn, phase), inputs, b)
        ctx.student.head.renormalize_last_layer()
        self._update_center(ctx, targets, b)
        if not b:
            return StepResult(float("nan"))
        loss = float(row_losses.mean())
        check_finite(loss, step, f"{phase} DP step")
        return StepResult(loss)

    # ------------------------------------------------------------------ helpers
    def _require_sampler(self) -> PatientPoissonSampler:
        if self._sampler is None:
            raise RuntimeError("DPStep.batch() before begin()")
        return self._sampler

    def _freeze(self, ctx: StepContext, step: int, phase: Phase) -> None:
        """Frozen tensors are neither clipped, noised nor moved: lr 0 / no gradient at all."""
        if ctx.schedules.last_layer_frozen(step):  # lr 0 instead of zeroed grads (noise)
            for group in ctx.optimizer.param_groups:
                if group.get("name") == "last_layer":
                    group["lr"] = 0.0
                    group["weight_decay"] = 0.0
        for p in ctx.params_3d:  # X-ray steps: the 3D tensors sit out
            p.requires_grad_(phase != "2d")

    @torch.no_grad()
    def _update_center(self, ctx: StepContext, targets: list[Tensor], batch: int) -> None:
        """"frozen": keep the received center; "gaussian": EMA towards a noised patient mean."""
        if self.privacy.center != CENTER_GAUSSIAN:
            return
        center = ctx.loss_fn.center
        k = center.shape[1]
        if batch:
            rows = torch.cat([t.reshape(batch, -1, k) for t in targets], dim=1).mean(dim=1)
        else:
            rows = center.new_zeros((0, k))
        mean = noised_mean(rows, self.privacy.center_clip, self.noise_multiplier, self._expected,
                           self._noise_gen)
        ctx.loss_fn.update_center_to(mean)

    # ------------------------------------------------------------------ public
    def public_metrics(self, ctx: StepContext, data: SiteData, start_step: int,
                       num_steps: int, stats: TrainStats) -> dict[str, float]:
        """Counts a DP site may release: functions of the public schedule and config only.

        The actual Poisson batch sizes, losses and timings are computed from private data
        without noise, so they stay in the site log; the aggregator's sample weights use the
        *expected* patients per step instead.
        """
        phases = [ctx.schedules.phase(s, data.has_2d, data.has_3d)
                  for s in range(start_step, start_step + num_steps)]
        per_step = float(self.privacy.patients_per_step)
        steps_2d, steps_3d = phases.count("2d"), phases.count("3d")
        s2d = round(per_step * (steps_2d + steps_3d * ctx.cfg.view_depth))
        s3d = round(per_step * steps_3d)
        return {ex.SAMPLES_2D: s2d, ex.SAMPLES_3D: s3d, ex.NUM_EXAMPLES: s2d + s3d,
                ex.STEPS: float(stats.steps)}
