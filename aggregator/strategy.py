"""The federation's strategy: build instructions, check and fold replies, summarise a round.

Shaped like Flower's strategies (configure_train / aggregate / configure_evaluate), but replies
are folded one at a time as they arrive (``accept_train``) instead of all at once, so the
aggregator holds one running sum per tensor plus the reply in hand. The round loop that drives it
(push, poll, deadline, quorum) is in :mod:`aggregator.rounds`.
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
from fed_unimiss.privacy.report import EPSILON, privacy_refusal

__all__ = ["DimensionAwareStrategy", "SiteResult", "state_to_record", "record_to_state"]

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


@dataclass
class _RoundState:
    round_num: int
    global_state: Mapping[str, torch.Tensor]
    aggregator: Aggregator
    accepted: list[SiteResult] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    evaluated: dict[str, dict[str, float]] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)  # DP sites: epsilon spent so far


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

    def configure_train(
        self, round_num: int, global_state: Mapping[str, torch.Tensor], node_ids: Iterable[int]
    ) -> list[Message]:
        """Start a round: reset the running sums and address the global state to every node."""
        self._round = _RoundState(
            round_num,
            global_state,
            make_aggregator(self.cfg.aggregation, global_state, self.classes, self.cfg.trim_fraction),
        )
        arrays, config = state_to_record(global_state), self.train_config(round_num)
        return [
            Message(RecordDict({ex.ARRAYS: arrays, ex.CONFIG: config}), node_id, ex.TRAIN,
                    group_id=str(round_num))
            for node_id in node_ids
        ]

    def accept_train(self, reply: Message) -> SiteResult | None:
        """Validate one reply and fold it in; a bad reply is logged, recorded and dropped."""
        rnd = self._require_round()
        node_id = reply.metadata.src_node_id
        label = self._label(reply)
        if label in rnd.rejected or any(r.label == label for r in rnd.accepted):
            label = f"{label}@node-{node_id}"  # two sites declared the same name
        try:
            if reply.has_error():
                # The error text comes from the site; record only its code.
                raise ReplyRejected(f"site reported an error (code {reply.error.code})")
            content = reply.content
            # Issue 7: a DP site whose budget is spent refuses with metrics only (no state).
            refusal = privacy_refusal(content.metric_records.get(ex.METRICS))
            if refusal is not None:
                rnd.epsilon[label] = refusal
                raise ReplyRejected(f"refused: privacy budget exhausted (epsilon spent "
                                    f"{refusal:.4g})")
            if ex.ARRAYS not in content.array_records or ex.METRICS not in content.metric_records:
                raise ReplyRejected("reply lacks the arrays or metrics record")
            report = parse_report(content.metric_records[ex.METRICS])
            record = content.array_records[ex.ARRAYS]
            bytes_in = record.count_bytes()
            state = record_to_state(record)
            norm = validate_state(state, rnd.global_state, self.cfg.max_update_norm)
        except ReplyRejected as e:
            log.warning("round %d: rejected reply of %s: %s", rnd.round_num, label, e)
            rnd.rejected[label] = str(e)
            return None
        eps = content.metric_records[ex.METRICS].get(EPSILON)  # issue 7: DP sites report it
        if isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps):
            rnd.epsilon[label] = float(eps)
        rnd.aggregator.add(state, report.samples_2d, report.samples_3d)
        result = SiteResult(node_id, label, report, norm, bytes_in)
        rnd.accepted.append(result)
        log.info("round %d: folded %s (2d=%d, 3d=%d, loss=%s)", rnd.round_num, label,
                 report.samples_2d, report.samples_3d, report.metrics.get(ex.LOSS))
        return result

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
        arrays, config = state_to_record(state), self.train_config(round_num)
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
            "rejected": dict(sorted(rnd.rejected.items())),
            "missing_nodes": sorted(missing),
            "seconds": seconds,
            "bytes_out_per_site": bytes_out_per_site,
            "bytes_in": sum(r.bytes_in for r in accepted),
            "epsilon": dict(sorted(rnd.epsilon.items())),  # issue 7: site -> epsilon spent
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
