"""The federation's strategy: build instructions, check and fold replies, summarise a round.

Shaped like Flower's strategies (configure_train / aggregate / configure_evaluate), but replies
are folded one at a time as they arrive (``accept_train``) instead of all at once, so the
aggregator holds one running sum per tensor plus the reply in hand. The round loop that drives it
(push, poll, deadline, quorum) is in :mod:`aggregator.rounds`.

Every train reply ends as one typed outcome (:data:`TrainOutcome`): a :class:`SiteResult`
folded in, a :class:`BudgetRefusal` (a DP site whose budget is spent), or a :class:`Rejection`
(an error reply, a malformed or out-of-bounds update, or, with ``require_dp``, a reply that
reports no DP). ``require_dp`` is the strategy's too: it stamps every train instruction with
:data:`~fed_unimiss.privacy.REQUIRE_DP` (a non-DP site then refuses with error 5103) and
rejects any train reply that carries no ``epsilon``. That is a protocol check, not a proof: the
aggregator trusts a site's report that it trained with DP (docs/privacy.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from aggregator.averaging import Aggregator, make_aggregator
from aggregator.validation import (
    ReplyRejected,
    SiteReport,
    parse_report,
    site_label,
    validate_state,
)
from fed_unimiss import exchange as ex
from fed_unimiss.federation import FederationConfig
from fed_unimiss.privacy.report import (
    ERROR_DP_REQUIRED,
    REQUIRE_DP,
    privacy_refusal,
    reported_budget,
    reported_epsilon,
)

__all__ = ["DimensionAwareStrategy", "SiteResult", "BudgetRefusal", "Rejection", "TrainOutcome",
           "state_to_record", "record_to_state"]

log = logging.getLogger(__name__)


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Global state -> ArrayRecord (float32 numpy arrays, names kept)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors; raises ``ReplyRejected`` for arrays torch cannot hold."""
    state: dict[str, torch.Tensor] = {}
    for name in list(record.keys()):
        try:
            state[name] = torch.from_numpy(record[name].numpy())
        except (TypeError, ValueError) as e:
            raise ReplyRejected(f"tensor {len(state) + 1} is not a numeric array") from e
    return state


@dataclass
class SiteResult:
    """One accepted train reply, as recorded in rounds.jsonl (numbers only)."""

    node_id: int
    label: str
    report: SiteReport
    update_norm: float
    bytes_in: int

    def as_row(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            ex.SAMPLES_2D: self.report.samples_2d,
            ex.SAMPLES_3D: self.report.samples_3d,
            "update_norm": self.update_norm,
            "bytes_in": self.bytes_in,
            **self.report.metrics,
        }


@dataclass(frozen=True)
class BudgetRefusal:
    """A DP site refused the round: its privacy budget would be exceeded."""

    label: str
    epsilon: float  # spent so far (NaN if the site reported none)

    @property
    def reason(self) -> str:
        return f"refused: privacy budget exhausted (epsilon spent {self.epsilon:.4g})"


@dataclass(frozen=True)
class Rejection:
    """A reply the strategy did not fold; ``reason`` names our checks, never the site's text."""

    label: str
    reason: str


TrainOutcome = SiteResult | BudgetRefusal | Rejection


@dataclass
class _RoundState:
    round_num: int
    global_state: Mapping[str, torch.Tensor]
    aggregator: Aggregator
    accepted: list[SiteResult] = field(default_factory=list)
    rejected: dict[str, BudgetRefusal | Rejection] = field(default_factory=dict)
    evaluated: dict[str, dict[str, float]] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)  # DP sites: epsilon spent so far
    epsilon_budget: dict[str, float] = field(default_factory=dict)  # DP sites: their target


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
    ):
        self.cfg = cfg
        self.recipe_json = recipe_json
        self.num_rounds = num_rounds
        self.classes = dict(classes)
        self._round: _RoundState | None = None

    # ------------------------------------------------------------------ train
    def train_config(self, round_num: int) -> ConfigRecord:
        """What every site needs to train this round the same way (no site-specific values)."""
        steps = self.cfg.local_steps
        return ConfigRecord({
            ex.RECIPE_JSON: self.recipe_json,
            ex.ROUND: round_num,
            ex.NUM_ROUNDS: self.num_rounds,
            ex.LOCAL_STEPS: steps,
            ex.START_STEP: (round_num - 1) * steps,
            ex.TOTAL_STEPS: self.num_rounds * steps,
            ex.EVAL_BATCHES: self.cfg.eval_batches,
        })

    def _instruction(self, round_num: int, message_type: str) -> ConfigRecord:
        config = self.train_config(round_num)
        if message_type == ex.TRAIN and self.cfg.require_dp:
            config[REQUIRE_DP] = True
        return config

    def configure_train(
        self, round_num: int, global_state: Mapping[str, torch.Tensor], node_ids: Iterable[int]
    ) -> list[Message]:
        """Start a round: reset the running sums and address the global state to every node."""
        self._round = _RoundState(
            round_num,
            global_state,
            make_aggregator(self.cfg.aggregation, global_state, self.classes, self.cfg.trim_fraction),
        )
        arrays, config = state_to_record(global_state), self._instruction(round_num, ex.TRAIN)
        return [
            Message(RecordDict({ex.ARRAYS: arrays, ex.CONFIG: config}), node_id, ex.TRAIN,
                    group_id=str(round_num))
            for node_id in node_ids
        ]

    def accept_train(self, reply: Message) -> TrainOutcome:
        """Validate one reply and fold it in; a bad reply is logged, recorded and dropped."""
        rnd = self._require_round()
        label = self._label(reply)
        if label in rnd.rejected or any(r.label == label for r in rnd.accepted):
            label = f"{label}@node-{reply.metadata.src_node_id}"  # two sites declared one name
        outcome = self._judge(reply, label, rnd)
        if isinstance(outcome, SiteResult):
            rnd.accepted.append(outcome)
            log.info("round %d: folded %s (2d=%d, 3d=%d, loss=%s)", rnd.round_num, label,
                     outcome.report.samples_2d, outcome.report.samples_3d,
                     outcome.report.metrics.get(ex.LOSS))
        else:
            rnd.rejected[label] = outcome
            if isinstance(outcome, BudgetRefusal):
                rnd.epsilon[label] = outcome.epsilon
            log.warning("round %d: rejected reply of %s: %s", rnd.round_num, label,
                        outcome.reason)
        return outcome

    def _judge(self, reply: Message, label: str, rnd: _RoundState) -> TrainOutcome:
        node_id = reply.metadata.src_node_id
        if reply.has_error():  # the error text comes from the site; record only its code
            return Rejection(label, f"site reported an error (code {reply.error.code})")
        content = reply.content
        metrics = content.metric_records.get(ex.METRICS)
        budget = reported_budget(metrics)
        if budget is not None:  # a DP site's target epsilon (a setting; issue 16's dashboard)
            rnd.epsilon_budget[label] = budget
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
            record = content.array_records[ex.ARRAYS]
            bytes_in = record.count_bytes()
            state = record_to_state(record)
            norm = validate_state(state, rnd.global_state, self.cfg.max_update_norm)
        except ReplyRejected as e:
            return Rejection(label, str(e))
        if epsilon is not None:  # DP sites report what they spent so far
            rnd.epsilon[label] = epsilon
        rnd.aggregator.add(state, report.samples_2d, report.samples_3d)
        return SiteResult(node_id, label, report, norm, bytes_in)

    def only_budget_refusals(self) -> bool:
        """True when the round rejected replies and every one was a privacy-budget refusal."""
        rejected = self._require_round().rejected.values()
        return bool(rejected) and all(isinstance(r, BudgetRefusal) for r in rejected)

    @property
    def num_accepted(self) -> int:
        return len(self._require_round().accepted)

    def aggregate_train(self) -> dict[str, torch.Tensor]:
        """The new global state from the folded replies (tensors nobody trained keep theirs)."""
        new_state = self._require_round().aggregator.result()
        for name, tensor in new_state.items():
            if not bool(torch.isfinite(tensor).all()):  # cannot happen after validation
                raise FloatingPointError(f"aggregated tensor {name} is not finite")
        return new_state

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, round_num: int, state: Mapping[str, torch.Tensor], node_ids: Iterable[int]
    ) -> list[Message]:
        arrays, config = state_to_record(state), self._instruction(round_num, ex.EVALUATE)
        return [
            Message(RecordDict({ex.ARRAYS: arrays, ex.CONFIG: config}), node_id, ex.EVALUATE,
                    group_id=f"{round_num}-eval")
            for node_id in node_ids
        ]

    def accept_evaluate(self, reply: Message) -> None:
        rnd = self._require_round()
        label = self._label(reply)
        if reply.has_error() or ex.METRICS not in reply.content.metric_records:
            log.warning("round %d: no evaluation from %s", rnd.round_num, label)
            return
        metrics = reply.content.metric_records[ex.METRICS]
        loss, n = metrics.get(ex.LOSS), metrics.get(ex.NUM_EXAMPLES, 1)
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            log.warning("round %d: evaluation of %s has no finite loss", rnd.round_num, label)
            return
        if not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
            n = 1
        rnd.evaluated[label] = {ex.LOSS: float(loss), ex.NUM_EXAMPLES: float(n)}

    # ------------------------------------------------------------------ summary
    def round_row(self, seconds: float, bytes_out_per_site: int, missing: list[int]) -> dict:
        """The rounds.jsonl row: who took part, their counts and metrics, who was dropped."""
        rnd = self._require_round()
        accepted = sorted(rnd.accepted, key=lambda r: r.label)
        total = sum(r.report.samples for r in accepted)
        losses = [(r.report.metrics[ex.LOSS], r.report.samples) for r in accepted
                  if ex.LOSS in r.report.metrics]
        loss = sum(v * n for v, n in losses) / sum(n for _, n in losses) if losses else None
        row: dict[str, Any] = {
            "round": rnd.round_num,
            "sites": [r.label for r in accepted],
            "loss": loss,
            ex.SAMPLES_2D: sum(r.report.samples_2d for r in accepted),
            ex.SAMPLES_3D: sum(r.report.samples_3d for r in accepted),
            "samples": total,
            "per_site": {r.label: r.as_row() for r in accepted},
            "rejected": {k: v.reason for k, v in sorted(rnd.rejected.items())},
            "missing_nodes": sorted(missing),
            "seconds": seconds,
            "bytes_out_per_site": bytes_out_per_site,
            "bytes_in": sum(r.bytes_in for r in accepted),
            "epsilon": dict(sorted(rnd.epsilon.items())),  # issue 7: site -> epsilon spent
            "epsilon_budget": dict(sorted(rnd.epsilon_budget.items())),  # site -> its target
        }
        if rnd.evaluated:
            weight = sum(v[ex.NUM_EXAMPLES] for v in rnd.evaluated.values()) or 1.0
            row["eval_loss"] = sum(v[ex.LOSS] * v[ex.NUM_EXAMPLES]
                                   for v in rnd.evaluated.values()) / weight
            row["eval_per_site"] = {k: v[ex.LOSS] for k, v in sorted(rnd.evaluated.items())}
        return row

    def _require_round(self) -> _RoundState:
        if self._round is None:
            raise RuntimeError("no round in progress: call configure_train first")
        return self._round

    @staticmethod
    def _label(reply: Message) -> str:
        node_id = reply.metadata.src_node_id
        declared = None
        if not reply.has_error() and ex.SITE in reply.content.config_records:
            declared = reply.content.config_records[ex.SITE].get(ex.SITE_NAME_KEY)
        return site_label(declared, node_id)
