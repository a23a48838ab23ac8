"""The federation's strategy: send the round's instructions, check and fold replies.

Shaped like Flower's strategies (configure_train / aggregate / configure_evaluate); the
instructions themselves are built by :mod:`aggregator.instructions`, the global state travels
through the exchange object (:class:`~fed_unimiss.exchange_link.Exchange`). Each reply is
checked on its own as it arrives (``accept_train``: its counts here, its update in
:mod:`aggregator.update_checks`: shape, finite values, norm bounds, replay) and parked on
disk; ``close_round``
screens the parked replies against each other (:mod:`aggregator.screening`), clips if the
aggregation says so, and folds them one at a time. :mod:`aggregator.rounds` drives it.

Every reply ends as one outcome in the round's :class:`~aggregator.run_summary.RoundRecord`
(the content of its rounds.jsonl row), and its node hears a
:class:`~aggregator.verdicts.SiteVerdict` in its next instruction or the run's last message.
``require_dp`` stamps every train instruction with :data:`~fed_unimiss.privacy.REQUIRE_DP` (a
non-DP site refuses with error 5103) and rejects a reply without ``epsilon``: a protocol check,
not a proof; the aggregator trusts a site's report that it trained with DP (docs/privacy.md).

Under ``exchange.up: secure`` no reply holds a readable update: the train instruction announces
the round's plan, a reply carries counts, metrics and signed keys, the stages that follow run in
a :class:`~aggregator.secure_round.SecureRound` (:mod:`aggregator.rounds` drives them), and
``aggregate_train`` adds the unmasked weighted mean to the global state. Nothing per site that
secure mode hides is recorded: no norms, no screening against the round's medians.
"""

from __future__ import annotations

import logging
import math
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message

from aggregator.averaging import make_aggregator
from aggregator.instructions import Instructions
from aggregator.replays import CoordinateSample, ReplayGuard
from aggregator.round_state import RoundState
from aggregator.run_summary import BudgetRefusal, Rejection, RoundRecord, SiteResult, TrainOutcome
from aggregator.screening import REJECTED, clip_state, screen_round
from aggregator.secure_round import SecureRound, check_aggregate, run_token
from aggregator.update_checks import UpdateChecks
from aggregator.validation import (
    ReplyLimits,
    ReplyRejected,
    SiteLabels,
    parse_report,
)
from aggregator.verdicts import ACCEPTED, CLIPPED, REFUSED, SiteVerdict
from fed_unimiss import exchange as ex
from fed_unimiss.exchange_link import Exchange
from fed_unimiss.federation import FederationConfig
from fed_unimiss.privacy.report import (
    ERROR_DP_REQUIRED,
    privacy_refusal,
    reported_epsilon,
)

__all__ = ["DimensionAwareStrategy"]

log = logging.getLogger(__name__)


class DimensionAwareStrategy:
    """Dimension-aware FedAvg (or a robust variant) of student, teacher and center.

    ``classes`` maps every exchanged tensor to ``2d``/``3d``/``shared``; see
    :func:`fed_unimiss.exchange.classify_exchange_keys`.
    """

    def __init__(
        self,
        cfg: FederationConfig,
        recipe_json: str,
        num_rounds: int,
        classes: Mapping[str, str],
        limits: ReplyLimits | None = None,
        spill_dir: str | Path | None = None,
        roster: Mapping[str, Any] | None = None,
    ):
        self.cfg = cfg
        # Decoded replies wait here for the round to close (aggregator/spill.py).
        self.spill_dir = Path(spill_dir) if spill_dir is not None else \
            Path(tempfile.gettempdir()) / f"fed-unimiss-spill-{uuid.uuid4().hex[:8]}"
        self.classes = dict(classes)
        self.limits = limits if limits is not None else ReplyLimits(cfg.max_update_norm or math.inf)
        # The exchange's end at the aggregator: its shared base and the base each node holds.
        self.link = Exchange(cfg.exchange)
        self.instructions = Instructions(cfg, recipe_json, num_rounds, self.limits)
        self._round: RoundState | None = None
        self._replays = ReplayGuard()
        self.updates = UpdateChecks(self.link, self.limits, self._replays, self.spill_dir)
        self._sampler: tuple[object, CoordinateSample] | None = None  # (layout key, sample)
        self._labels = SiteLabels()  # node id -> the label its replies declared
        self._told: dict[int, SiteVerdict] = {}  # the previous round's verdicts, sent this round
        # up: secure: every site's identity public key, the round being run, the run's token
        if self.link.masked and not roster:
            raise ValueError("exchange.up: secure needs the roster of site identity keys (the "
                             "coordinator kit's roster/, or simulate's own)")
        self.roster = dict(roster or {})
        self.secure: SecureRound | None = None
        self._token = run_token()

    # ------------------------------------------------------------------ train
    def configure_train(
        self, round_num: int, global_state: Mapping[str, torch.Tensor], node_ids: Iterable[int]
    ) -> list[Message]:
        """Start a round: reset the running sums and address the global state to every node."""
        self._cleanup()
        previous = self._round
        self._told = dict(previous.verdicts) if previous is not None else {}
        if previous is not None and previous.sent_sample:  # its replies are judged: now old
            self._replays.remember_sent(previous.sent_sample, _sent_in(previous.round_num))
        keys = self.link.sent_keys(global_state)
        reference = {k: global_state[k] for k in keys}
        self._round = RoundState(
            round_num,
            global_state,
            make_aggregator(self.cfg.aggregation, reference, self.classes, self.cfg.trim_fraction),
            reference=reference,
            bounds=self.limits.part_bounds(global_state),
            sampler=self._sample_of(reference),
        )
        rnd = self._round
        rnd.global_sample = rnd.sampler.of(reference)
        down = self.link.send_state(global_state)
        rnd.sent_sample = down.received_sample(rnd.sampler.of, rnd.global_sample)
        extra = None
        if self.link.masked:  # the plan every site quantises and masks with, announced now
            self.secure = SecureRound.planned(round_num, self._token, self.roster,
                                              self.cfg.exchange, self.link, global_state,
                                              self.classes, self.limits)
            extra = self.secure.config()
        sent = self.instructions.train(round_num, down, node_ids, self.link.held_by, self._told,
                                       extra)
        rnd.record.costs.sent = sent.bytes_per_node
        for digest, what in sent.digests.items():
            self._replays.remember(digest, f"the global {what} sent in round {round_num}")
        return sent.messages

    def _sample_of(self, reference: Mapping[str, torch.Tensor]) -> CoordinateSample:
        """The run's coordinate sample for this layout (rebuilt only if the layout changes)."""
        key = tuple((name, tuple(t.shape)) for name, t in reference.items())
        if self._sampler is None or self._sampler[0] != key:
            self._sampler = (key, CoordinateSample(dict(key)))
        return self._sampler[1]

    def accept_train(self, reply: Message) -> TrainOutcome:
        """Check one reply on its own and hold it for the round's screening (``close_round``).

        A bad reply is logged, recorded and dropped at once. A ``SiteResult`` returned here is
        provisional: the round's screening may still reject or clip it.
        """
        rnd = self._require_round()
        if rnd.closed:
            raise RuntimeError(f"round {rnd.round_num} is closed; start the next with "
                               "configure_train")
        label = self._label(reply)
        node_id = reply.metadata.src_node_id
        self.link.node_answered(node_id, ok=not reply.has_error())
        if label in rnd.record.rejected or any(r.label == label for r, _ in rnd.held):
            label = f"{label}@node-{reply.metadata.src_node_id}"  # two sites declared one name
        outcome = self._judge(reply, label, rnd)
        if not isinstance(outcome, SiteResult):
            self._reject(rnd, outcome)
            own = isinstance(outcome, BudgetRefusal) or reply.has_error()  # the site said why
            rnd.verdicts[node_id] = SiteVerdict(
                rnd.round_num, REFUSED if own else REJECTED,
                outcome.reason if own else (outcome.site_reason or outcome.reason))
        return outcome

    def _reject(self, rnd: RoundState, outcome: BudgetRefusal | Rejection) -> None:
        rnd.record.reject(outcome)
        log.warning("round %d: rejected reply of %s: %s", rnd.round_num, outcome.label,
                    outcome.reason)

    def close_round(self) -> None:
        """Screen the held replies against each other, then fold the survivors one at a time.

        Idempotent. Afterwards ``num_accepted`` counts the replies that will shape the model.
        """
        rnd = self._require_round()
        if rnd.closed:
            return
        rnd.closed = True
        if self.secure is not None:  # nothing readable is held: the stages sum what arrived
            rnd.record.screening = self.secure.screening(
                self.cfg.aggregation, self.link.ring_items(rnd.global_state), rnd.bounds,
                self.limits.max_update_norm)
            return
        held, rnd.held = rnd.held, []
        norms = {r.label: r.norms for r, _ in held}
        states = {r.label: state for r, state in held}
        medians, verdicts = screen_round(
            norms, states, rnd.reference, self.cfg.norm_factor, self.cfg.min_cosine,
            clip_to_median=self.cfg.aggregation == "clipped_mean")
        rnd.record.screening = {
            "median_norm": medians, "norm_factor": self.cfg.norm_factor,
            "min_cosine": self.cfg.min_cosine, "max_update_norm": self.limits.max_update_norm,
            "part_bounds": rnd.bounds, "aggregation": self.cfg.aggregation}
        for result, state in held:
            verdict = result.verdict = verdicts[result.label]
            site_reason = verdict.site_reason or "rejected by the round's screening"
            if verdict.action == REJECTED:
                detail = {"norms": result.norms, **verdict.as_row()}
                detail.pop("action", None)
                detail.pop("reason", None)
                self._reject(rnd, Rejection(result.label, verdict.reason or "", detail,
                                            site_reason))
                rnd.verdicts[result.node_id] = SiteVerdict(rnd.round_num, REJECTED, site_reason)
                continue
            rnd.verdicts[result.node_id] = SiteVerdict(rnd.round_num, CLIPPED, site_reason) \
                if verdict.action == CLIPPED else SiteVerdict(rnd.round_num, ACCEPTED)
            if verdict.scales:
                state = clip_state(state, rnd.reference, verdict.scales)
                log.warning("round %d: %s %s", rnd.round_num, result.label, verdict.reason)
            rnd.aggregator.add(state, result.report.samples_2d, result.report.samples_3d)
            self._replays.remember(result.digest,
                                   f"a reply of {result.label} in round {rnd.round_num}")
            rnd.record.accepted.append(result)
            log.info("round %d: folded %s (2d=%d, 3d=%d, loss=%s)", rnd.round_num,
                     result.label, result.report.samples_2d, result.report.samples_3d,
                     result.report.metrics.get(ex.LOSS))

    def _judge(self, reply: Message, label: str, rnd: RoundState) -> TrainOutcome:
        node_id = reply.metadata.src_node_id
        if reply.has_error():  # the error text comes from the site; record only its code
            code = int(reply.error.code)
            return Rejection(label, f"refused: {ex.error_category(code)} (code {code})")
        content = reply.content
        metrics = content.metric_records.get(ex.METRICS)
        rnd.record.note_reports(label, metrics)  # whatever becomes of the update
        refusal = privacy_refusal(metrics)  # a DP site whose budget is spent: metrics only
        if refusal is not None:
            return BudgetRefusal(label, refusal)
        epsilon = reported_epsilon(metrics)
        if self.cfg.require_dp and epsilon is None:
            log.warning("node %d sent a train reply without DP (no epsilon) although the "
                        "federation requires DP: rejected", node_id)
            return Rejection(label, "no DP report although the federation requires differential "
                             f"privacy (code {ERROR_DP_REQUIRED})")
        try:
            if ex.ARRAYS not in content.array_records or metrics is None:
                raise ReplyRejected("reply lacks the arrays or metrics record")
            report = parse_report(metrics)
            self.limits.check_counts(report, dp=epsilon is not None)
            if self.secure is not None:
                result = self.secure.accept_advert(label, node_id, content.array_records[ex.ARRAYS],
                                                   report, rnd.record.costs)
            else:
                result = self.updates.check(content, report, label, node_id, rnd)
        except ReplyRejected as e:
            return Rejection(label, str(e), site_reason=e.for_site)
        if epsilon is not None:  # DP sites report what they spent so far
            rnd.record.epsilon[label] = epsilon
        return result

    def aggregate_secure(self) -> dict[str, torch.Tensor]:
        """Close the secure round: unmask the sum, add its weighted mean to the global state.

        Raises ``TooFewSurvivors`` below the threshold and ``AggregateRefused`` when the mean
        update is not finite or a part's norm exceeds the bound of one honest update (the
        mean of honest updates obeys it too); the round then fails and the state is unchanged.
        """
        rnd, secure = self._require_round(), self.secure
        assert secure is not None
        result, new_state, norms = secure.unmask_into(self.link, rnd.global_state)
        rnd.record.screening.update(secure.outcome(result, norms))
        for rejection in secure.settle(result, rnd.record, rnd.verdicts):
            self._reject(rnd, rejection)
        check_aggregate(norms, rnd.bounds)
        return self.link.checkpoint_state(new_state)

    def close(self) -> None:
        """Delete whatever replies are still parked (a failed round) and the spill folder."""
        self._cleanup()
        try:
            self.spill_dir.rmdir()
        except OSError:
            pass

    def _cleanup(self) -> None:
        if self._round is not None:
            for spilled in self._round.spills:
                spilled.delete()
            self._round.spills.clear()

    def replay_snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What the replay checks remember, this round's sent state included, to write with
        the round's checkpoint (aggregator/run_store.py)."""
        rnd = self._round
        pending = (_sent_in(rnd.round_num), rnd.sent_sample) \
            if rnd is not None and rnd.sent_sample else None
        return self._replays.snapshot(pending)

    def restore_replays(self, tensors: Mapping[str, torch.Tensor],
                        strings: Mapping[str, str]) -> None:
        """A resumed run's replay memory, from before the restart."""
        self._replays.restore(tensors, strings)

    def last_verdicts(self) -> dict[int, SiteVerdict]:
        """node id -> the decision on its reply in the current (last) round; {} before any."""
        return dict(self._round.verdicts) if self._round is not None else {}

    @property
    def record(self) -> RoundRecord:
        """What the current round did with each reply so far: its rounds.jsonl row's content."""
        return self._require_round().record

    @property
    def num_accepted(self) -> int:
        """Replies folded into this round (after ``close_round``), or held so far (before)."""
        rnd = self._require_round()
        if self.secure is not None and self.secure.round_num == rnd.round_num \
                and not rnd.record.accepted:  # before the sum: the sites still in the round
            return len(self.secure.results)
        return len(rnd.record.accepted) + len(rnd.held)

    def aggregate_train(self) -> dict[str, torch.Tensor]:
        """The new global state from the folded replies (tensors nobody trained keep theirs)."""
        self.close_round()
        if self.secure is not None:
            return self.aggregate_secure()
        rnd = self._require_round()
        folded = rnd.aggregator.result()
        self._cleanup()
        new_state = {name: folded.get(name, ref) for name, ref in rnd.global_state.items()}
        new_state = self.link.checkpoint_state(new_state)
        for name, tensor in new_state.items():  # cannot happen after validation
            if not math.isfinite(float(tensor.sum(dtype=torch.float64))) \
                    and not bool(torch.isfinite(tensor).all()):
                raise FloatingPointError(f"aggregated tensor {name} is not finite")
        return new_state

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, round_num: int, state: Mapping[str, torch.Tensor], node_ids: Iterable[int]
    ) -> list[Message]:
        """The state in full (an evaluation leaves a shared base alone) to every node."""
        payload = self.link.send_state(state, train=False).for_node(None)
        return self.instructions.evaluate(round_num, payload, node_ids)

    def accept_evaluate(self, reply: Message) -> None:
        rnd = self._require_round()
        metrics = None if reply.has_error() else reply.content.metric_records.get(ex.METRICS)
        problem = rnd.record.add_evaluation(self._label(reply), metrics)
        if problem is not None:
            log.warning("round %d: %s", rnd.round_num, problem)

    def _require_round(self) -> RoundState:
        if self._round is None:
            raise RuntimeError("no round in progress: call configure_train first")
        return self._round

    def _label(self, reply: Message) -> str:
        """The reply's site label (:class:`~aggregator.validation.SiteLabels`)."""
        if reply.has_error():
            declared = ex.error_site(reply.error.reason)
        else:
            declared = reply.content.config_records.get(ex.SITE, {}).get(ex.SITE_NAME_KEY)
        return self._labels.of(reply.metadata.src_node_id, declared)


def _sent_in(round_num: int) -> str:
    """How a replay check names the global state sent in ``round_num``."""
    return f"the global state sent in round {round_num}"
