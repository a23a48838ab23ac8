"""The instructions the coordinator sends each round, to train or to evaluate.

Every site is told the same thing (the recipe, the round's step window, the announced exchange,
the DP requirement and plan, whether to probe), except for two things that are its own: the
payload it can decode (with a shared base, the int8 change for a node that holds the last base
and the base in full for any other, :class:`~fed_unimiss.exchange_link.Downlink`) and the
decision on its reply of the previous round (:class:`~aggregator.verdicts.SiteVerdict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from aggregator.exchange_records import to_record, wire_digest
from aggregator.validation import ReplyLimits
from aggregator.verdicts import SiteVerdict, with_verdict
from fed_unimiss import exchange as ex
from fed_unimiss.exchange_link import Downlink, Payload
from fed_unimiss.federation import FederationConfig
from fed_unimiss.privacy.report import DP_PLAN_PATIENTS_PER_STEP, REQUIRE_DP

__all__ = ["Instructions", "SentRound"]


@dataclass
class SentRound:
    """One round's train instructions as sent.

    ``bytes_per_node`` is each instruction's size (arrays + config); ``digests`` maps the wire
    digest of every distinct payload to what it carried (state, base, delta), for the replay
    guard.
    """

    messages: list[Message] = field(default_factory=list)
    bytes_per_node: dict[int, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


class Instructions:
    """Builds the run's train and evaluate instructions."""

    def __init__(self, cfg: FederationConfig, recipe_json: str, num_rounds: int,
                 limits: ReplyLimits):
        self.cfg = cfg
        self.recipe_json = recipe_json
        self.num_rounds = num_rounds
        self.limits = limits

    def config(self, round_num: int, message_type: str) -> ConfigRecord:
        """What every site needs to train or evaluate this round alike (nothing site-specific)."""
        steps = self.cfg.local_steps
        config = ConfigRecord({
            ex.RECIPE_JSON: self.recipe_json,
            ex.ROUND: round_num,
            ex.NUM_ROUNDS: self.num_rounds,
            ex.LOCAL_STEPS: steps,
            ex.START_STEP: (round_num - 1) * steps,
            ex.TOTAL_STEPS: self.num_rounds * steps,
            ex.EVAL_BATCHES: self.cfg.eval_batches,
            **self.cfg.exchange.to_config(),
        })
        if message_type != ex.TRAIN:
            return config
        if self.cfg.require_dp:
            config[REQUIRE_DP] = True
        if self.limits.dp_patients_per_step is not None:
            config[DP_PLAN_PATIENTS_PER_STEP] = float(self.limits.dp_patients_per_step)
        every = self.cfg.probe_every
        if every and (round_num - 1) % every == 0:
            config[ex.PROBE] = True  # sites with a probe set probe the state they receive
        return config

    def train(self, round_num: int, down: Downlink, node_ids: Iterable[int],
              held_by: Callable[[int], str | None], told: Mapping[int, SiteVerdict],
              extra: Mapping[str, object] | None = None) -> SentRound:
        """Address this round's global state to every node, as that node can decode it.

        ``held_by`` names the base a node holds (None: none), ``told`` the verdict each node
        hears on its previous reply, ``extra`` config every node gets this round (a secure
        round's plan). A payload shared by several nodes becomes one record.
        """
        sent = SentRound()
        records: dict[int, ArrayRecord] = {}
        for node_id in node_ids:
            payload = down.for_node(held_by(node_id))
            record = records.get(id(payload))
            if record is None:
                record = records[id(payload)] = to_record(payload.arrays)
            config = with_verdict(self.config(round_num, ex.TRAIN), told.get(node_id))
            _put_exchange_keys(config, payload)
            for key, value in (extra or {}).items():
                config[key] = value
            sent.bytes_per_node[node_id] = record.count_bytes() + config.count_bytes()
            sent.messages.append(Message(RecordDict({ex.ARRAYS: record, ex.CONFIG: config}),
                                         node_id, ex.TRAIN, group_id=str(round_num)))
        for payload in down.payloads():
            if id(payload) in records:
                sent.digests[wire_digest(records[id(payload)])] = payload.what
        return sent

    def evaluate(self, round_num: int, payload: Payload, node_ids: Iterable[int]
                 ) -> list[Message]:
        """The same evaluate instruction (state and config) for every node."""
        arrays = to_record(payload.arrays)
        config = self.config(round_num, ex.EVALUATE)
        _put_exchange_keys(config, payload)
        return [Message(RecordDict({ex.ARRAYS: arrays, ex.CONFIG: config}), node_id,
                        ex.EVALUATE, group_id=f"{round_num}-eval")
                for node_id in node_ids]


def _put_exchange_keys(config: ConfigRecord, payload: Payload) -> None:
    """The payload's own keys (layout, base digests) join the instruction's config."""
    for key, value in payload.config.items():
        config[key] = value
