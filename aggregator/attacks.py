"""Misbehaving sites for ``simulate --attack NAME=KIND``: check a configuration before a real run.

The attack lives here, with the in-process simulation, never in site_client/ (the code hospitals
run). :class:`AttackGrid` delivers a message to the real ClientApp like
:class:`~aggregator.inprocess.InProcessGrid` and then rewrites the train reply of each attacking
site; evaluation replies are left alone. The kinds:

- ``replace``: the state is an arbitrary target (every tensor zero), with the largest counts the
  round's count bound admits (maximal claimed weight).
- ``inflate``: the honest reply with its counts x1000.
- ``signflip``: the honest update negated (global - update).
- ``boost``: the honest update negated and scaled x25, so that one site outweighs the others
  (model replacement, Bagdasaryan et al. 2020): large next to an honest update, small next to
  the worst-case bound an honest update can reach.
- ``noise``: the global state plus a random update 20x the norm of the site's honest one, per part.
- ``nan``: the honest reply with its first student tensor NaN.
- ``stale``: the state the site was sent in its first round, replayed every round (a zero update
  in round 1; from round 2 a pull back to round 1's model).

Under ``exchange.up: secure`` no update travels readable, so the attacker acts where a site running
its own code would: it keeps the counts rewrite above, and before the masked-input stage it
replaces its own ring vector (in the simulated site's memory) with the ring encoding of the
attacked update, at the weights of the counts it claimed. It is not bound by the ring's clip: it
writes any integer mod 2^k (a non-finite value, which the ring cannot hold, becomes its most
negative integer). The masks still cancel; what the aggregator can do against it is in
docs/privacy.md.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.clientapp import ClientApp

from aggregator.deploy.fab import IN_PROCESS_SESSIONS
from aggregator.exchange_records import instruction_payload, put_reply_payload, reply_payload
from aggregator.inprocess import InProcessGrid, SiteSpec, load_component
from aggregator.validation import count_bound, part_of
from fed_unimiss import exchange as ex
from fed_unimiss.exchange_config import ExchangeConfig
from fed_unimiss.exchange_link import Exchange
from fed_unimiss.secure_aggregation.ring import RingPlan, part_weights, signed_sum
from fed_unimiss.secure_aggregation.wire import MASKED_INPUT, STAGE, plan_from_config

__all__ = ["ATTACKS", "AttackGrid", "parse_attack", "attack_state"]

ATTACKS = ("replace", "inflate", "signflip", "boost", "noise", "nan", "stale")
INFLATE_FACTOR = 1000
BOOST_FACTOR = 25.0
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
    if kind == "boost":
        return {k: (sent[k].double() - BOOST_FACTOR * (honest[k].double() - sent[k].double()))
                .to(sent[k].dtype) for k in sent}
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


@dataclass
class _SecureTrain:
    """What a secure attacker noted from its train round, for its masked-input stage."""

    sent: dict[str, torch.Tensor]
    round_num: int
    honest: dict[str, int] | None  # part weights of its true counts (its ring vector's)
    claimed: dict[str, int] | None  # part weights of the counts it replied (None: beyond the ring)


def _coordinate_values(ring: RingPlan, per_part: Mapping[str, int] | None = None) -> np.ndarray:
    """Per coordinate of the ring vector: its block's scale, or (``per_part``) its part's weight."""
    if per_part is None:
        return np.repeat(ring.scales.astype(np.float64), ring.block)[:ring.size]
    return np.concatenate([np.full(size, float(per_part[part])) for size, part in ring.layout])


def _honest_state(vector: np.ndarray, ring: RingPlan, weights: Mapping[str, int],
                  names: list[str], sent: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state a ring vector stands for: ``sent`` plus its levels / weight x scale."""
    w = _coordinate_values(ring, weights)
    update = np.where(w > 0, signed_sum(vector, ring) / np.maximum(w, 1.0), 0.0)
    update *= _coordinate_values(ring)
    out, start = {}, 0
    for name in names:
        size = sent[name].numel()
        step = torch.from_numpy(update[start:start + size]).view(sent[name].shape)
        out[name] = (sent[name].double() + step).to(sent[name].dtype)
        start += size
    return out


def _attacker_vector(state: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor],
                     names: list[str], ring: RingPlan, weights: Mapping[str, int]) -> np.ndarray:
    """The ring encoding of ``state - sent`` at ``weights``, unclipped, wrapped mod 2^k."""
    update = torch.cat([(state[n].double() - sent[n].double()).reshape(-1) for n in names])
    levels = update.numpy() / _coordinate_values(ring)
    extreme = -float(1 << (ring.bits - 1))
    levels = np.clip(np.where(np.isfinite(levels), np.rint(levels), extreme), -2.0**40, 2.0**40)
    weighted = levels.astype(np.int64) * _coordinate_values(ring, weights).astype(np.int64)
    return (weighted & np.int64(ring.mask)).astype(ring.dtype)


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
        self._secure: dict[int, _SecureTrain] = {}  # node -> its open secure round

    def _exchange(self, node: int, config: ConfigRecord) -> Exchange:
        """The attacker's end of the exchange: it holds the base as its honest client does."""
        announced = ExchangeConfig.from_config(config)
        link = self._links.get(node)
        if link is None or link.config != announced:
            link = self._links[node] = Exchange(announced)
        return link

    def deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        kind = self.attacks.get(node)
        if kind is not None and msg.metadata.message_type == ex.SECURE_STAGE \
                and msg.content.config_records[ex.CONFIG].get(STAGE) == MASKED_INPUT:
            self._replace_ring_vector(node, kind)
        reply = super().deliver(msg)
        if kind is None or reply is None or msg.metadata.message_type != ex.TRAIN \
                or reply.has_error() or ex.ARRAYS not in reply.content.array_records:
            return reply
        config = msg.content.config_records[ex.CONFIG]
        link = self._exchange(node, config)  # attack in fp32, then encode as announced
        sent = link.receive_state(instruction_payload(msg.content))
        self._first_sent.setdefault(node, sent)
        round_num = int(config[ex.ROUND])
        metrics = dict(reply.content.metric_records[ex.METRICS])
        plan = plan_from_config(config) if link.masked else None
        if plan is not None:  # the ring vector is replaced at the masked-input stage
            self._secure[node] = _SecureTrain(sent, round_num, self._weights(metrics, plan.ring),
                                              None)
        else:
            honest = dict(link.receive_update(reply_payload(reply.content), sent))
            state = attack_state(kind, honest, sent, self._first_sent[node], seed=round_num)
            # a fresh end: the attacker's reply carries no error feedback of earlier rounds
            put_reply_payload(reply.content, Exchange(link.config).send_update(state, sent))
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
        if plan is not None:
            self._secure[node].claimed = self._weights(metrics, plan.ring)
        reply.content[ex.METRICS] = MetricRecord(metrics)
        return reply

    @staticmethod
    def _weights(metrics: Mapping[str, float], ring: RingPlan) -> dict[str, int] | None:
        try:
            return part_weights(int(metrics.get(ex.SAMPLES_2D, 0)),
                                int(metrics.get(ex.SAMPLES_3D, 0)), ring)
        except ValueError:  # counts the ring cannot weigh: the aggregator refuses the reply
            return None

    def _replace_ring_vector(self, node: int, kind: str) -> None:
        """Before the masked-input stage: the attacker's ring vector becomes its attack's."""
        noted = self._secure.pop(node, None)
        sessions = load_component(IN_PROCESS_SESSIONS)().sessions
        session = sessions.get(str(self.contexts[node].node_config[ex.NODE_STATE_DIR]))
        pending = None if session is None else session.secure
        if noted is None or noted.honest is None or noted.claimed is None or pending is None \
                or pending.ring_vector is None:
            return  # the site is out of this round already
        ring = pending.plan.ring
        names = [name for name, _ in self._links[node].ring_items(noted.sent)]
        sent = {n: noted.sent[n] for n in names}
        honest = _honest_state(pending.ring_vector, ring, noted.honest, names, sent)
        first = self._first_sent[node]
        state = attack_state(kind, honest, sent, {n: first[n] for n in names},
                             seed=noted.round_num)
        pending.ring_vector = _attacker_vector(state, sent, names, ring, noted.claimed)
