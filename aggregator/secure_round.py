"""The aggregator's side of a secure round (``exchange.up: secure``): plan, relay, sum, unmask.

A secure round is the train instruction plus three stages, each one more exchange of messages
through the round loop's push/pull (:mod:`aggregator.rounds`), each with the round's deadline::

    train (+ the announced plan)  -> counts, metrics, signed keys (stage 1, advertise)
    train.secure share_keys       -> every advert to every advertiser; sealed shares back
    train.secure masked_input     -> each site's inbox of sealed shares; its masked vector back
    train.secure unmask           -> the survivors; the shares that remove the masks back

The plan (:func:`make_plan`) is announced with the train instruction: the roster's sites, the
threshold, and the ring: one scale per block from the clip, the same for every site, and integer
weights fitted to the count bounds. :class:`SecureRound` holds what the aggregator may hold
(fed_unimiss/secure_aggregation/server.py): signed public keys, shares it cannot open, the
running sum of masked vectors, each site's counts (in the clear, as in the plain exchange) and
who dropped where. A site that errs or is silent at a stage has dropped; the protocol removes
its masks, and below the threshold the round fails (:class:`TooFewSurvivors`), like a round
below ``min_sites``.

What is left to screen (docs/privacy.md): the count bounds, the ring's L-infinity clip (every
coordinate of every update; each site reports how many coordinates it cut, the round records
only the total) and the aggregate itself (finite, its norm per part against the bound one honest
update obeys).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from aggregator.run_summary import Rejection, RoundCosts, RoundRecord, SiteResult
from aggregator.validation import (
    ADAM_STEP_FACTOR,
    CENTER_LIMIT,
    PARTS,
    ReplyLimits,
    ReplyRejected,
    SiteReport,
    part_of,
)
from aggregator.verdicts import ACCEPTED, REJECTED, SiteVerdict
from fed_unimiss import exchange as ex
from fed_unimiss.exchange import class_weight
from fed_unimiss.exchange_config import ExchangeConfig, SecureConfig
from fed_unimiss.exchange_link import Exchange
from fed_unimiss.secure_aggregation import (
    AggregateResult,
    AggregatorParty,
    RoundPlan,
    SecureAggregationError,
    min_threshold,
)
from fed_unimiss.secure_aggregation.plan import group_size, harary_order
from fed_unimiss.secure_aggregation.ring import PARTS as RING_PARTS
from fed_unimiss.secure_aggregation.ring import part_weights, plan_ring
from fed_unimiss.secure_aggregation.wire import (
    MASKED_INPUT,
    ROUND_ID,
    SHARE_KEYS,
    STAGE,
    SURVIVORS,
    UNMASK,
    from_arrays,
    masked_from_arrays,
    plan_to_config,
    to_arrays,
)

__all__ = ["SecureRound", "AggregateRefused", "make_plan", "coordinate_clips", "run_token",
           "mean_norms", "part_steps"]

# The reply names of site_client/secure_site.py (the wire between the two packages).
ADVERT, SEALED, INBOX, CLIPPED = "advert", "sealed", "inbox", "clipped"


class AggregateRefused(SecureAggregationError):
    """The unmasked aggregate fails its checks (not finite, or a part moved further than one
    honest update can): the round fails and the global state stays as it was."""


def run_token() -> str:
    """A fresh token per run (and per resumption): round ids must never repeat, because they
    bind every site's keys and seeds to one round."""
    return uuid.uuid4().hex[:16]


def coordinate_clips(state: Mapping[str, torch.Tensor], names: list[str], limits: ReplyLimits
                     ) -> dict[str, float]:
    """The derived L-infinity clip of each travelling tensor this round (``clip: null``).

    - student: Adam moves a coordinate at most ``ADAM_STEP_FACTOR`` x peak lr per step, plus
      AdamW's decay (lr x weight decay x the tensor's largest weight) per step;
    - teacher: its EMA moves it by at most ``teacher_pull`` of (its largest gap to the global
      student + the student's clip);
    - center: a running mean of cosines, so both ends lie in [-CENTER_LIMIT, CENTER_LIMIT]; its
      EMA moves it by at most ``center_pull`` of that range.

    The same per-coordinate reasoning as the plain exchange's norm bounds
    (:meth:`~aggregator.validation.ReplyLimits.part_bounds`), computed from the state the round
    starts at, so every site gets the same clip.
    """
    steps, lr = limits.local_steps, limits.lr_peak

    def student(name: str) -> float:
        w = float(state[name].abs().max()) if state[name].numel() else 0.0
        return ADAM_STEP_FACTOR * lr * steps + lr * limits.weight_decay_max * steps * w

    clips = {}
    for name in names:
        if name == ex.CENTER_KEY:
            clips[name] = 2 * CENTER_LIMIT * limits.center_pull
        elif name.startswith(ex.TEACHER_PREFIX):
            twin = ex.STUDENT_PREFIX + name[len(ex.TEACHER_PREFIX):]
            gap = float((state[twin].float() - state[name].float()).abs().max()) \
                if twin in state and state[name].numel() else 0.0
            clips[name] = limits.teacher_pull * (gap + (student(twin) if twin in state else 0))
        else:
            clips[name] = student(name)
        clips[name] = max(clips[name], 1e-12)  # a frozen tensor still needs a positive scale
    return clips


def _block_clips(sizes: list[int], clips: list[float], block: int) -> np.ndarray:
    """One clip per block of the flat vector: the largest clip of the tensors it touches."""
    total = sum(sizes)
    out = np.zeros(math.ceil(total / block), dtype=np.float64)
    start = 0
    for size, clip in zip(sizes, clips, strict=True):
        first, last = start // block, (start + size - 1) // block
        out[first:last + 1] = np.maximum(out[first:last + 1], clip)
        start += size
    return out


def _max_count(limits: ReplyLimits) -> int:
    """The largest weight-bearing count one reply may claim (the ring's weights must fit it)."""
    most = 1
    for bound in (limits.counts, limits.dp_counts):
        if bound is not None:
            most = max(most, *(int(class_weight(p, bound.max_2d, bound.max_3d))
                               for p in RING_PARTS))
    return most


def make_plan(round_id: str, roster: Mapping[str, ec.EllipticCurvePublicKey],
              settings: SecureConfig, layout: tuple[tuple[int, str], ...],
              names: list[str], state: Mapping[str, torch.Tensor], limits: ReplyLimits
              ) -> RoundPlan:
    """The plan announced with a round's train instruction; ``ValueError`` naming the setting
    that cannot work (a threshold above the roster's size, a ring that could overflow)."""
    sites = tuple(sorted(roster))
    degree = settings.neighbours if settings.neighbours is not None \
        and settings.neighbours < len(sites) - 1 else None
    threshold = settings.threshold or min_threshold(len(sites), degree)
    group = group_size(len(sites), degree)
    if threshold > group:
        raise ValueError(f"exchange.secure.threshold: {threshold} is more than the "
                         f"{group} sites that hold a site's shares"
                         + (f" (itself and its {degree} neighbours)" if degree else ""))
    sizes = [size for size, _ in layout]
    if settings.clip is not None:
        clip: float | np.ndarray = settings.clip
    else:
        per_tensor = coordinate_clips(state, names, limits)
        clip = _block_clips(sizes, [per_tensor[n] for n in names], settings.block)
    try:
        ring = plan_ring(layout, n_sites=len(sites), max_count=_max_count(limits), clip=clip,
                         bits=settings.bits, levels=settings.levels, block=settings.block)
        return RoundPlan(round_id, sites, threshold, ring, degree,
                         harary_order(sites) if degree else ())
    except ValueError as e:
        raise ValueError(f"exchange.secure: {e}") from None


@dataclass
class SecureRound:
    """One secure round at the aggregator (see the module docstring for the message flow)."""

    round_num: int
    plan: RoundPlan
    party: AggregatorParty
    node_of: dict[str, int] = field(default_factory=dict)  # site -> node id
    weights: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> part weights
    results: dict[str, SiteResult] = field(default_factory=dict)  # provisional, per site
    dropped: dict[str, str] = field(default_factory=dict)  # site -> where and why it dropped
    clipped: int = 0  # coordinates cut by the ring's clip, over every masked input received
    stage: str = "advertise"
    _asked: set[str] = field(default_factory=set)  # sites sent the open stage's message
    _answered: set[str] = field(default_factory=set)

    @classmethod
    def start(cls, round_num: int, plan: RoundPlan,
              roster: Mapping[str, ec.EllipticCurvePublicKey]) -> SecureRound:
        return cls(round_num, plan, AggregatorParty(plan, roster))

    @classmethod
    def planned(cls, round_num: int, token: str, roster: Mapping[str, ec.EllipticCurvePublicKey],
             exchange: ExchangeConfig, link: Exchange, state: Mapping[str, torch.Tensor],
             classes: Mapping[str, str], limits: ReplyLimits) -> SecureRound:
        """Round ``round_num`` of the run ``token``, planned for ``state`` (:func:`make_plan`)."""
        names = [name for name, _ in link.ring_items(state)]
        plan = make_plan(f"{token}/{round_num}", roster, exchange.ring,
                         link.ring_layout(state, classes), names, state, limits)
        return cls.start(round_num, plan, roster)

    def config(self) -> dict[str, Any]:
        """The plan as the train instruction's config values."""
        return plan_to_config(self.plan)

    # ------------------------------------------------------------ stage 1 (the train reply)
    def accept_advert(self, label: str, node_id: int, record: ArrayRecord, report: SiteReport,
                      costs: RoundCosts) -> SiteResult:
        """A train reply's signed keys (its provisional result); ``ReplyRejected`` naming the
        site when they are not its own (its identity key in the roster did not sign them) or
        its counts do not fit the ring."""
        bytes_in = record.count_bytes()
        costs.note(label, report.metrics.get(ex.SECONDS), bytes_in, node_id)
        if label not in self.plan.sites:
            raise ReplyRejected(f"site {label!r} is not in the roster of this secure round",
                                for_site="this site is not in the coordinator's roster")
        if label in self.node_of:
            raise ReplyRejected(f"a second reply for site {label!r}")
        arrays = {k: record[k].numpy() for k in record.keys()}
        try:
            weights = part_weights(report.samples_2d, report.samples_3d, self.plan.ring)
            advert = from_arrays(arrays).get(ADVERT)
            if advert is None or len(arrays) != len(advert):
                raise ValueError("the reply holds no advertised keys, or more than them")
            self.party.receive_advert(label, advert)
        except (ValueError, SecureAggregationError) as e:
            raise ReplyRejected(f"secure round: {e}") from None
        self.node_of[label] = node_id
        self.weights[label] = weights
        result = self.results[label] = SiteResult(node_id, label, report, None, bytes_in, None)
        return result

    # ------------------------------------------------------------ stages 2-4
    def messages(self, stage: str) -> list[Message]:
        """Close the open stage and address ``stage`` to the sites still in the round.

        Raises ``TooFewSurvivors`` when the closed stage left fewer than the threshold.
        """
        self._close_open_stage()
        config = {STAGE: stage, ROUND_ID: self.plan.round_id, ex.ROUND: self.round_num}
        per_site: dict[str, dict[str, np.ndarray]]
        if stage == SHARE_KEYS:
            adverts = self.party.adverts()
            shared = to_arrays(adverts)
            per_site = dict.fromkeys(sorted(adverts), shared)
        elif stage == MASKED_INPUT:
            per_site = {site: to_arrays({INBOX: inbox})
                        for site, inbox in self.party.inboxes().items()}
        elif stage == UNMASK:
            survivors = self.party.survivors()
            config[SURVIVORS] = json.dumps(survivors)
            per_site = dict.fromkeys(survivors, {})
        else:
            raise ValueError(f"unknown secure stage {stage!r}")
        self.stage, self._asked, self._answered = stage, set(per_site), set()
        records: dict[int, ArrayRecord] = {}
        out = []
        for site, arrays in per_site.items():
            record = records.get(id(arrays))
            if record is None:
                record = records[id(arrays)] = ArrayRecord(
                    {k: Array(v) for k, v in arrays.items()})
            out.append(Message(RecordDict({ex.ARRAYS: record,
                                           ex.CONFIG: ConfigRecord(dict(config))}),
                               self.node_of[site], ex.SECURE_STAGE,
                               group_id=f"{self.round_num}-{stage}"))
        return out

    def accept(self, reply: Message) -> None:
        """A reply of the open stage; a bad one drops its site (recorded, never raised)."""
        site = next((s for s, n in self.node_of.items() if n == reply.metadata.src_node_id),
                    None)
        if site is None or site not in self._asked or site in self._answered:
            return
        self._answered.add(site)
        if reply.has_error():
            self.dropped[site] = f"refused at {self.stage} (code {int(reply.error.code)})"
            return
        arrays = {k: v.numpy() for k, v in
                  reply.content.array_records.get(ex.ARRAYS, ArrayRecord()).items()}
        if site in self.results:  # what the site sent up, all stages together
            self.results[site].bytes_in += sum(int(a.nbytes) for a in arrays.values())
        try:
            if self.stage == SHARE_KEYS:
                self.party.receive_shares(site, from_arrays(arrays).get(SEALED, {}))
            elif self.stage == MASKED_INPUT:
                masked = masked_from_arrays(arrays, self.plan.ring)
                clipped = self._clipped(reply)
                self.party.receive_masked(site, masked, self.weights[site])
                self.clipped += clipped
            elif self.stage == UNMASK:
                self.party.receive_unmask(site, from_arrays(arrays))
        except (ValueError, SecureAggregationError) as e:
            self.dropped[site] = f"bad reply at {self.stage}: {e}"

    def _clipped(self, reply: Message) -> int:
        metrics = reply.content.metric_records.get(ex.METRICS, {})
        value = metrics.get(CLIPPED, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not 0 <= value <= self.plan.ring.size or value != int(value):
            raise ValueError(f"clipped count {value!r} is not in [0, {self.plan.ring.size}]")
        return int(value)

    def _close_open_stage(self) -> None:
        for site in sorted(self._asked - self._answered):
            self.dropped.setdefault(site, f"no reply at {self.stage} by the deadline")

    def finish(self) -> AggregateResult:
        """Close the unmask stage and unmask the sum (``TooFewSurvivors`` below threshold)."""
        self._close_open_stage()
        self._asked = set()
        return self.party.finish()

    def unmask_into(self, link: Exchange, state: Mapping[str, torch.Tensor]
                    ) -> tuple[AggregateResult, dict[str, torch.Tensor], dict[str, float] | None]:
        """(the unmasked result, ``state`` plus its weighted mean update, the mean's norm per
        part); a mean that is not finite leaves ``state`` as it is and has no norms (None)."""
        result = self.finish()
        mean = result.mean()
        if not bool(torch.isfinite(mean).all()):
            return result, dict(state), None
        new_state = link.add_mean(state, mean)
        names = [name for name, _ in link.ring_items(state)]
        return result, new_state, mean_norms(state, new_state, names)

    def settle(self, result: AggregateResult, record: RoundRecord,
               verdicts: dict[int, SiteVerdict]) -> list[Rejection]:
        """Each site's outcome once the sum is unmasked: in the sum (accepted), or dropped out
        of it (returned, for the caller to record). Its bytes are every stage's reply."""
        out = []
        for site, res in sorted(self.results.items()):
            record.costs.bytes_up[res.label] = res.bytes_in
            if site in result.survivors:
                record.accepted.append(res)
                verdicts[res.node_id] = SiteVerdict(self.round_num, ACCEPTED)
                continue
            why = self.dropped.get(site, "its masked input is not in the sum")
            out.append(Rejection(res.label, f"dropped out of the secure round: {why}"))
            verdicts[res.node_id] = SiteVerdict(
                self.round_num, REJECTED, "this site's update is not in the round's secure sum "
                "(it dropped out of a stage)")
        return out

    def screening(self, aggregation: str, items: list[tuple[str, tuple[int, ...]]],
                  bounds: Mapping[str, float], max_update_norm: float | None) -> dict[str, Any]:
        """The round row's screening section when the round closes: the ring and the bounds,
        nothing per site."""
        ring = self.plan.ring
        return {
            "mode": "secure", "aggregation": aggregation,
            "threshold": self.plan.threshold, "roster_sites": len(self.plan.sites),
            "neighbours": self.plan.degree,  # None: every other site
            "ring": {"bits": ring.bits, "levels": ring.levels, "max_weight": ring.max_weight,
                     "weight_unit": ring.weight_unit, "block": ring.block,
                     "clip_max": float(ring.scales.max()) * ring.levels,
                     "clip_min": float(ring.scales.min()) * ring.levels,
                     "step": part_steps(self.plan, items)},
            "part_bounds": bounds, "max_update_norm": max_update_norm}

    def outcome(self, result: AggregateResult, norms: dict[str, float] | None
                ) -> dict[str, Any]:
        """What the row adds once the sum is unmasked: who is in it, and the aggregate's checks."""
        return {"survivors": len(result.survivors), "clipped": self.clipped,
                "dropped_before_upload": list(result.dropped_before_upload),
                "silent_at_unmask": list(result.silent_at_unmask),
                "mean_update_norm": norms or {}, "mean_finite": norms is not None}


def check_aggregate(norms: dict[str, float] | None, bounds: Mapping[str, float]) -> None:
    """``AggregateRefused`` when the mean update is not finite (no norms) or a part's norm
    exceeds the bound of one honest update (the mean of honest updates obeys it too)."""
    if norms is None:
        raise AggregateRefused("the unmasked mean update is not finite")
    over = {p: (n, bounds[p]) for p, n in norms.items() if p in bounds and n > bounds[p]}
    if over:
        raise AggregateRefused("the mean update exceeds the bound of one honest update: "
                               + ", ".join(f"{p} {n:.4g} > {b:.4g}"
                                           for p, (n, b) in sorted(over.items())))


def part_steps(plan: RoundPlan, items: list[tuple[str, tuple[int, ...]]]) -> dict[str, float]:
    """The largest quantisation step (clip / levels) of each part's coordinates this round:
    what one coordinate of the mean update may differ from the plain mean by (clipped
    coordinates aside)."""
    steps = dict.fromkeys(PARTS, 0.0)
    start, ring = 0, plan.ring
    for name, shape in items:
        size = math.prod(shape)
        blocks = ring.scales[start // ring.block:(start + size - 1) // ring.block + 1]
        steps[part_of(name)] = max(steps[part_of(name)], float(blocks.max()))
        start += size
    return steps


def mean_norms(state: Mapping[str, torch.Tensor], new_state: Mapping[str, torch.Tensor],
               names: list[str]) -> dict[str, float]:
    """The L2 norm of the mean update per part (student, teacher, center)."""
    sq = dict.fromkeys(PARTS, 0.0)
    for name in names:
        diff = new_state[name].double() - state[name].double()
        sq[part_of(name)] += float(diff.pow(2).sum())
    return {part: math.sqrt(v) for part, v in sq.items()}
