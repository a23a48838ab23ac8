"""Misbehaving sites for ``simulate --attack NAME=KIND``: check a configuration before a real run.

The attack lives here, with the in-process simulation, never in site_client/ (the code hospitals
run). :class:`AttackGrid` delivers a message to the real ClientApp like
:class:`~aggregator.inprocess.InProcessGrid` and then rewrites the train reply of each attacking
site; evaluation replies are left alone. The kinds:

- ``replace``: the state is an arbitrary target (every tensor zero), with the largest counts the
  round's count bound admits (maximal claimed weight).
- ``inflate``: the honest reply with its counts x1000.
- ``signflip``: the honest update negated (global - update).
- ``noise``: the global state plus a random update 20x the norm of the site's honest one, per part.
- ``nan``: the honest reply with its first student tensor NaN.
- ``stale``: the state the site was sent in its first round, replayed every round (a zero update
  in round 1; from round 2 a pull back to round 1's model).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.clientapp import ClientApp

from aggregator.exchange_records import instruction_payload, put_reply_payload, reply_payload
from aggregator.inprocess import InProcessGrid, SiteSpec
from aggregator.validation import count_bound, part_of
from fed_unimiss import exchange as ex
from fed_unimiss.exchange_config import ExchangeConfig
from fed_unimiss.exchange_link import Exchange

__all__ = ["ATTACKS", "AttackGrid", "parse_attack", "attack_state"]

ATTACKS = ("replace", "inflate", "signflip", "noise", "nan", "stale")
INFLATE_FACTOR = 1000
NOISE_FACTOR = 20.0


def parse_attack(text: str) -> tuple[str, str]:
    """``NAME=KIND`` -> (name, kind); argparse turns the error into a usage error."""
    name, sep, kind = text.partition("=")
    if not sep or not name or kind not in ATTACKS:
        raise argparse.ArgumentTypeError(
            f"--attack {text!r}: expected NAME=KIND with KIND one of {', '.join(ATTACKS)}")
    return name, kind


@torch.no_grad()
def attack_state(kind: str, honest: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor],
                 first_sent: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The state an attacker of ``kind`` replies, from its honest reply and what it was sent."""
    if kind == "replace":
        return {k: torch.zeros_like(v) for k, v in sent.items()}
    if kind == "signflip":
        return {k: 2 * sent[k] - honest[k] for k in sent}
    if kind == "nan":
        out = {k: v.clone() for k, v in honest.items()}
        first = next(k for k in out if k.startswith(ex.STUDENT_PREFIX))
        out[first].fill_(float("nan"))
        return out
    if kind == "stale":
        return {k: v.clone() for k, v in first_sent.items()}
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in sent.items()}
        out = {}
        for part in {part_of(k) for k in sent}:
            names = [k for k in sent if part_of(k) == part]
            own = math.sqrt(sum(float((honest[k].double() - sent[k].double()).pow(2).sum())
                                for k in names))
            size = math.sqrt(sum(float(noise[k].pow(2).sum()) for k in names))
            scale = NOISE_FACTOR * max(own, 1e-3) / size
            for k in names:
                out[k] = (sent[k].double() + scale * noise[k]).to(sent[k].dtype)
        return out
    if kind == "inflate":
        return dict(honest)
    raise ValueError(f"attack kind {kind!r}: expected one of {', '.join(ATTACKS)}")


class AttackGrid(InProcessGrid):
    """An in-process grid where the sites named in ``attacks`` misbehave (see module docstring)."""

    def __init__(self, client_app: ClientApp, sites: Sequence[SiteSpec], state_root: str | Path,
                 attacks: Mapping[str, str], run_id: int | None = None):
        super().__init__(client_app, sites, state_root, run_id)
        names = [s.name for s in sites]
        unknown = [n for n in attacks if n not in names]
        if unknown:
            raise ValueError(f"--attack names unknown site(s) {unknown} (sites: {names})")
        bad = [k for k in attacks.values() if k not in ATTACKS]
        if bad:
            raise ValueError(f"--attack kind(s) {bad}: expected one of {', '.join(ATTACKS)}")
        self.attacks = {node: attacks[s.name] for node, s in enumerate(sites, start=1)
                        if s.name in attacks}
        self._first_sent: dict[int, dict[str, torch.Tensor]] = {}
        self._links: dict[int, Exchange] = {}  # node -> the attacker's end of the exchange

    def _exchange(self, node: int, config: ConfigRecord) -> Exchange:
        """The attacker's end of the exchange: it holds the base as its honest client does."""
        announced = ExchangeConfig.from_config(config)
        link = self._links.get(node)
        if link is None or link.config != announced:
            link = self._links[node] = Exchange(announced)
        return link

    def deliver(self, msg: Message) -> Message | None:
        reply = super().deliver(msg)
        node = msg.metadata.dst_node_id
        kind = self.attacks.get(node)
        if kind is None or reply is None or msg.metadata.message_type != ex.TRAIN \
                or reply.has_error() or ex.ARRAYS not in reply.content.array_records:
            return reply
        config = msg.content.config_records[ex.CONFIG]
        link = self._exchange(node, config)  # attack in fp32, then encode as announced
        sent = link.receive_state(instruction_payload(msg.content))
        self._first_sent.setdefault(node, sent)
        honest = dict(link.receive_update(reply_payload(reply.content), sent))
        round_num = int(config[ex.ROUND])
        state = attack_state(kind, honest, sent, self._first_sent[node], seed=round_num)
        # a fresh end: the attacker's reply carries no error feedback of earlier rounds
        put_reply_payload(reply.content, Exchange(link.config).send_update(state, sent))
        metrics = dict(reply.content.metric_records[ex.METRICS])
        if kind == "inflate":
            for key in ex.COUNT_METRICS:
                if key in metrics:
                    metrics[key] = int(metrics[key]) * INFLATE_FACTOR
        elif kind == "replace":  # the most weight the aggregator's count bound admits
            ssl = json.loads(str(config[ex.RECIPE_JSON]))["ssl"]
            bound = count_bound(int(config[ex.LOCAL_STEPS]), ssl["batch_size_2d"],
                                ssl["batch_size_3d"], ssl["view_depth"])
            metrics.update({ex.SAMPLES_2D: bound.max_2d, ex.SAMPLES_3D: bound.max_3d,
                            ex.NUM_EXAMPLES: bound.max_2d + bound.max_3d})
        reply.content[ex.METRICS] = MetricRecord(metrics)
        return reply
