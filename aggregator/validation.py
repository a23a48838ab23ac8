"""Checks every site reply passes before the aggregator folds it.

A reply is dropped, with a reason, when its tensors do not match the global state (names,
shapes, dtypes), hold a non-finite value, move too far from the global state (L2 norm of the
student, teacher or center update above the absolute bound, :func:`default_max_update_norm`),
or when its counts are not non-negative integers with at least one of them positive, or exceed
what the round could have trained (:func:`count_bound`). Counts above the bound are *rejected*,
not capped: the bound is what our own trainer can report, so only a broken or lying client
exceeds it, and the rest of such a reply deserves no more trust than its counts.
Reasons are built from our own tensor names and numbers only, never from text the site sent, so
nothing a site controls reaches the aggregator's logs.

A whole state in memory is checked with :func:`check_state`; the strategy decodes a reply one
tensor at a time and calls the same per-tensor and per-part checks (:func:`check_finite`,
:func:`check_part_norms`) as it goes.

The run's bounds are resolved once, from the federation config and the recipe, into
:class:`ReplyLimits` (each part's norm bound, the count bounds, the DP plan announced to the
sites). The checks relative to the round (norm against the round's median, direction) need every
reply of the round and live in :mod:`aggregator.screening`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fed_unimiss import exchange as ex
from fed_unimiss.exchange_link import name_mismatch

if TYPE_CHECKING:
    from fed_unimiss.federation import FederationConfig

__all__ = ["ReplyRejected", "SiteReport", "CountBound", "parse_report", "validate_state",
           "check_state", "check_finite", "check_part_norms", "check_trained", "update_norms",
           "count_bound", "check_counts", "default_max_update_norm",
           "ReplyLimits", "check_center", "CENTER_LIMIT", "site_label", "SiteLabels", "PARTS", "part_of"]

# The parts of the exchanged state, each checked on its own (its norms differ by 10-100x).
PARTS = ("student", "teacher", ex.CENTER_KEY)
# Adam moves a coordinate by at most ~lr per step (|m_hat / sqrt(v_hat)| <= 1 for steady
# gradients); 3 leaves room for bias-correction transients. Measured honest micro updates reach
# up to 0.38 of lr x steps x sqrt(P) (docs/federation.md, "Robustness").
ADAM_STEP_FACTOR = 3.0


class ReplyRejected(ValueError):
    """A reply the aggregator will not use; ``str(e)`` is the reason logged and recorded.

    ``for_site`` replaces it in what the site is told (aggregator/verdicts.py) when the reason
    names something of another site; the reasons built here name only the reply's own numbers
    and the run's bounds, which the site may hear as they are.
    """

    def __init__(self, reason: str, for_site: str | None = None) -> None:
        super().__init__(reason)
        self.for_site = for_site


@dataclass(frozen=True)
class SiteReport:
    """The numbers one site reported with its state."""

    samples_2d: int
    samples_3d: int
    metrics: dict[str, float]

    @property
    def samples(self) -> int:
        return self.samples_2d + self.samples_3d


def part_of(name: str) -> str:
    """``student``, ``teacher`` or ``center`` for an exchanged tensor name."""
    if name == ex.CENTER_KEY:
        return ex.CENTER_KEY
    return name.split(".", 1)[0]


@dataclass(frozen=True)
class CountBound:
    """The largest counts one reply may claim this round, and where the numbers come from."""

    max_2d: int
    max_3d: int
    basis: str  # e.g. "local_steps 4 x batch_size_2d 4" (our config, never site text)


def count_bound(local_steps: int, batch_size_2d: int, batch_size_3d: int, view_depth: int,
                patients_per_step: float | None = None) -> CountBound:
    """What one round of ``local_steps`` could have trained, per kind.

    Without DP a 2D step counts at most ``batch_size_2d`` images and a 3D step at most
    ``batch_size_3d`` sub-volumes, each also ``view_depth`` slices through the 2D path
    (fed_unimiss/ssl/engine.py). A DP site reports its Poisson plan's expected counts
    (patients_per_step per step, fed_unimiss/ssl/dp_step.py), so its bound is that plan.
    """
    if patients_per_step is None:
        per_2d = max(batch_size_2d, batch_size_3d * view_depth)
        return CountBound(local_steps * per_2d, local_steps * batch_size_3d,
                          f"local_steps {local_steps} x max(batch_size_2d {batch_size_2d}, "
                          f"batch_size_3d {batch_size_3d} x view_depth {view_depth}) / x "
                          f"batch_size_3d")
    max_3d = math.ceil(patients_per_step * local_steps)
    return CountBound(math.ceil(patients_per_step * local_steps * max(1, view_depth)), max_3d,
                      f"DP plan: local_steps {local_steps} x patients_per_step "
                      f"{patients_per_step:g} (x view_depth {view_depth} for 2D)")


def check_counts(report: SiteReport, bound: CountBound) -> None:
    """Raise ``ReplyRejected`` when a count exceeds what the round could have trained."""
    for key, value, limit in ((ex.SAMPLES_2D, report.samples_2d, bound.max_2d),
                              (ex.SAMPLES_3D, report.samples_3d, bound.max_3d)):
        if value > limit:
            raise ReplyRejected(f"count {key} {value} above the round's bound {limit} "
                                f"({bound.basis})")


def default_max_update_norm(lr_peak: float, weight_decay_max: float, local_steps: int,
                            num_params: int, weight_norm: float) -> float:
    """The absolute bound on one part's update norm when the config leaves it null.

    Adam's step bound (``ADAM_STEP_FACTOR`` x peak lr per coordinate per step) over
    ``local_steps`` steps and ``num_params`` student parameters, plus AdamW's decoupled weight
    decay (lr x weight decay x the weights' norm per step). Derived from the recipe, so every
    preset gets its own; the micro measurements behind it are in docs/federation.md.
    """
    adam = ADAM_STEP_FACTOR * lr_peak * local_steps * math.sqrt(num_params)
    decay = lr_peak * weight_decay_max * local_steps * weight_norm
    return adam + decay


# Every head logit is a cosine (unit-norm bottleneck feature times a unit-norm prototype row,
# fed_unimiss/models/head.py), so the center, a running mean of logits started at zero, has
# every coordinate in [-1, 1]. The 5 % covers bf16/fp16 logits and int8 transport rounding.
CENTER_LIMIT = 1.05


@dataclass(frozen=True)
class ReplyLimits:
    """The per-reply bounds of a run, resolved once from the federation config and the recipe.

    ``max_update_norm`` bounds the student's update. When it comes from the recipe
    (``derived``), the teacher and the center get the bounds their own updates obey
    (:meth:`part_bounds`) and the center's coordinates must lie in the head's logit range
    (:func:`check_center`). A number from the config replaces all of these with one bound for
    every part.
    """

    max_update_norm: float = math.inf  # the student's; every part's unless derived
    counts: CountBound | None = None  # replies without DP
    dp_counts: CountBound | None = None  # replies reporting epsilon (Poisson plan)
    # The DP plan behind dp_counts, announced in every train instruction: a DP site with more
    # expected patients per step adopts this value or refuses before it spends budget.
    dp_patients_per_step: float | None = None
    derived: bool = False  # max_update_norm is the recipe's Adam bound, not a config number
    teacher_pull: float = 1.0  # 1 - momentum^local_steps: the teacher's share of its EMA gap
    # The recipe's step sizes, for per-coordinate bounds (the secure ring's derived clip):
    lr_peak: float = 0.0  # the peak learning rate as the trainer scales it
    weight_decay_max: float = 0.0
    local_steps: int = 1
    center_pull: float = 1.0  # 1 - center_momentum^(center updates a round): its EMA's share

    @classmethod
    def of_run(cls, cfg: FederationConfig, recipe: Any,
               state: Mapping[str, torch.Tensor]) -> ReplyLimits:
        """The run's bounds: update norm (config or the recipe's Adam bound) and counts."""
        from fed_unimiss.privacy.config import PrivacyConfig

        ssl = recipe.ssl
        bound = cfg.max_update_norm
        derived = bound is None
        if derived:
            student = [v for k, v in state.items() if k.startswith(ex.STUDENT_PREFIX)]
            weight_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in student))
            bound = default_max_update_norm(
                lr_peak=ssl.lr * max(ssl.batch_size_2d, ssl.batch_size_3d) / 256,
                weight_decay_max=max(ssl.weight_decay, ssl.weight_decay_end),
                local_steps=cfg.local_steps, num_params=sum(v.numel() for v in student),
                weight_norm=weight_norm)
        per_step = cfg.max_patients_per_step
        if per_step is None:
            per_step = float((cfg.site_privacy or {}).get("dp-patients-per-step",
                                                           PrivacyConfig.patients_per_step))
        sizes = (cfg.local_steps, ssl.batch_size_2d, ssl.batch_size_3d, ssl.view_depth)
        return cls(bound, count_bound(*sizes), count_bound(*sizes, patients_per_step=per_step),
                   dp_patients_per_step=per_step, derived=derived,
                   teacher_pull=1.0 - ssl.momentum_teacher ** cfg.local_steps,
                   lr_peak=ssl.lr * max(ssl.batch_size_2d, ssl.batch_size_3d) / 256,
                   weight_decay_max=max(ssl.weight_decay, ssl.weight_decay_end),
                   local_steps=cfg.local_steps,
                   center_pull=1.0 - ssl.center_momentum ** (cfg.local_steps
                                                             * max(1, ssl.accumulate)))

    def check_counts(self, report: SiteReport, dp: bool) -> None:
        """Raise ``ReplyRejected`` when a count exceeds what the round could have trained: a
        reply that reports epsilon is held to the DP plan, any other to the batch sizes."""
        bound = self.dp_counts if dp else self.counts
        if bound is not None:
            check_counts(report, bound)

    def part_bounds(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Each part's bound on an honest update norm this round, from the state it starts at.

        A config number bounds every part alike. Derived from the recipe:

        - student: ``max_update_norm`` (the recipe's Adam bound, :func:`default_max_update_norm`).
        - teacher: an EMA of the student, ``T <- m T + (1 - m) S``, so over the round it moves
          by at most ``teacher_pull`` (``1 - m^local_steps``) of the largest distance from the
          starting teacher to a student, i.e. of (global student - global teacher gap + the
          student's bound).
        - center: both ends lie in ``[-CENTER_LIMIT, CENTER_LIMIT]^out_dim``, so the update is
          at most ``2 CENTER_LIMIT sqrt(out_dim)``. A running mean of logits can move that far
          in one round while the student barely moves (measured 13.1 for tiny with 20 steps,
          against an Adam bound of 4.9), which is why the center does not share the student's
          bound.
        """
        student_bound = self.max_update_norm
        if not self.derived:
            return dict.fromkeys(PARTS, student_bound)
        sq_gap = 0.0
        for name, value in global_state.items():
            if name.startswith(ex.STUDENT_PREFIX):
                twin = global_state.get(ex.TEACHER_PREFIX + name[len(ex.STUDENT_PREFIX):])
                if twin is not None:
                    sq_gap += float((value.double() - twin.double()).pow(2).sum())
        bounds = {"student": student_bound,
                  "teacher": self.teacher_pull * (math.sqrt(sq_gap) + student_bound)}
        center = global_state.get(ex.CENTER_KEY)
        bounds[ex.CENTER_KEY] = 2 * CENTER_LIMIT * math.sqrt(center.numel()) \
            if center is not None else student_bound
        return bounds


def check_center(value: torch.Tensor) -> None:
    """Reject a center with a coordinate no head of ours can produce (see ``CENTER_LIMIT``)."""
    peak = float(value.abs().max()) if value.numel() else 0.0
    if not peak <= CENTER_LIMIT:
        raise ReplyRejected(f"center coordinate {peak:.4g} outside [-{CENTER_LIMIT}, "
                            f"{CENTER_LIMIT}] (head logits are cosines)")


def _count(metrics: Mapping[str, Any], key: str) -> int:
    if key not in metrics:
        raise ReplyRejected(f"metric {key!r} missing")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyRejected(f"count {key!r} is not a number")
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ReplyRejected(f"count {key!r} must be a non-negative integer, got {value!r}")
    return int(value)


def parse_report(metrics: Mapping[str, Any]) -> SiteReport:
    """Counts and scalar metrics of a train reply's MetricRecord; raises ``ReplyRejected``."""
    samples_2d = _count(metrics, ex.SAMPLES_2D)
    samples_3d = _count(metrics, ex.SAMPLES_3D)
    if samples_2d == 0 and samples_3d == 0:
        raise ReplyRejected("both sample counts are zero (the site trained on nothing)")
    scalars: dict[str, float] = {}
    for key in ex.TRAIN_METRICS:
        value = metrics.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReplyRejected(f"metric {key!r} is not a number")
        if not math.isfinite(value):
            raise ReplyRejected(f"metric {key!r} is not finite")
        scalars[key] = float(value)
    return SiteReport(samples_2d, samples_3d, scalars)


def update_norms(state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
                 ) -> dict[str, float]:
    """L2 norm of (state - global) per part (student, teacher, center), in float64."""
    sq = dict.fromkeys(PARTS, 0.0)
    for name, ref in global_state.items():
        diff = state[name].to(torch.float64) - ref.to(torch.float64)
        sq[part_of(name)] = sq.get(part_of(name), 0.0) + float(diff.pow(2).sum())
    return {part: math.sqrt(value) for part, value in sq.items()}


def validate_state(
    state: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    max_update_norm: float,
) -> float:
    """:func:`check_state`, returning the whole update's L2 norm."""
    norms = check_state(state, global_state, max_update_norm)
    return math.sqrt(sum(n * n for n in norms.values()))


def check_state(
    state: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    max_update_norm: float,
) -> dict[str, float]:
    """Check a reply state against the global state; returns the update norm of each part.

    Raises ``ReplyRejected`` naming the first problem: missing or unexpected tensors, a shape or
    dtype mismatch, a non-finite value, or a student, teacher or center update norm above
    ``max_update_norm``.
    """
    problem = name_mismatch(state, global_state)
    if problem:
        raise ReplyRejected(problem)
    for name, ref in global_state.items():
        value = state[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise ReplyRejected(
                f"{name}: shape {tuple(value.shape)} != expected {tuple(ref.shape)}"
            )
        if value.dtype != ref.dtype:
            raise ReplyRejected(f"{name}: dtype {value.dtype} != expected {ref.dtype}")
        check_finite(name, value)
    norms = update_norms(state, global_state)
    check_part_norms(norms, {}, max_update_norm)
    return norms


def check_finite(name: str, value: torch.Tensor, update_norm: float | None = None) -> None:
    """Raise ``ReplyRejected`` when ``value`` holds a non-finite value.

    A non-finite value makes the update's norm non-finite, so a finite ``update_norm`` (already
    computed by the caller) proves the tensor finite without a second pass over it.
    """
    if update_norm is not None and math.isfinite(update_norm):
        return
    if not bool(torch.isfinite(value).all()):
        raise ReplyRejected(f"{name}: non-finite values")


def check_part_norms(norms: Mapping[str, float], bounds: Mapping[str, float],
                     default: float = math.inf) -> None:
    """Raise ``ReplyRejected`` when a part's update norm is non-finite or above its bound
    (``bounds[part]``, else ``default``)."""
    for part, norm in norms.items():
        bound = bounds.get(part, default)
        if not math.isfinite(norm) or norm > bound:
            raise ReplyRejected(f"{part} update norm {norm:.4g} exceeds max_update_norm "
                                f"{bound:.4g}")


def check_trained(norms: Mapping[str, float]) -> None:
    """Raise ``ReplyRejected`` when no part moved: the reply is the state it was sent."""
    if not any(norms.values()):
        raise ReplyRejected("state identical to the global state sent (nothing trained)")


def site_label(declared: Any, node_id: int) -> str:
    """The name a site appears under in logs and rounds.jsonl.

    The site's declared ``site-name`` (a label hospital IT chose, e.g. "A") when it is a short
    plain identifier; otherwise ``node-<id>``. Anything else a site might put there (a path, free
    text) is ignored rather than echoed.
    """
    if ex.is_valid_site_name(declared):
        return str(declared)
    return f"node-{node_id}"


class SiteLabels:
    """The label each node's replies appear under, remembered for the run.

    A reply names its site in its site record, or at the start of an error reply's text; either
    is validated (:func:`site_label`). A reply that names none, or an invalid one, takes the label
    its node declared before, else ``node-<id>``: an error reply from a site whose name was seen
    is still filed under that name.
    """

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def of(self, node_id: int, declared: Any) -> str:
        label = site_label(declared, node_id)
        if label == site_label(None, node_id):
            return self._names.get(node_id, label)
        self._names[node_id] = label
        return label
