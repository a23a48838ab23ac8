"""A readable train reply checked on its own, as it arrives, and parked on disk.

The plain exchange's per-reply checks (``exchange.up`` other than ``secure``), in the order a
reply meets them: a replayed wire digest, then one tensor at a time as it decodes under the
announced codec: finite values, the center's range, each part's update norm against the round's
bound (:class:`~aggregator.validation.ReplyLimits`), and last a coordinate sample against the
states of the run (:class:`~aggregator.replays.ReplayGuard`). A reply that passes waits in the
spill folder (:mod:`aggregator.spill`) for the round's screening; the strategy
(:mod:`aggregator.strategy`) decides what becomes of it.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from aggregator.exchange_records import record_tensors, wire_digest
from aggregator.replays import ReplayGuard
from aggregator.round_state import RoundState
from aggregator.run_summary import SiteResult
from aggregator.spill import SpilledState, SpillWriter
from aggregator.validation import (
    PARTS,
    ReplyLimits,
    ReplyRejected,
    SiteReport,
    check_center,
    check_finite,
    check_part_norms,
    check_trained,
    part_of,
)
from fed_unimiss import exchange as ex
from fed_unimiss import exchange_codec as codec
from fed_unimiss.exchange_link import Exchange, Payload

__all__ = ["UpdateChecks"]


class UpdateChecks:
    """The checks of one reply on its own; shares the strategy's exchange and replay guard."""

    def __init__(self, link: Exchange, limits: ReplyLimits, replays: ReplayGuard,
                 spill_dir: Path):
        self.link, self.limits, self.replays, self.spill_dir = link, limits, replays, spill_dir

    def check(self, content: Any, report: SiteReport, label: str, node_id: int,
                      rnd: RoundState) -> SiteResult:
        """A readable update: decoded, checked and parked (``ReplyRejected`` naming why not)."""
        record = content.array_records[ex.ARRAYS]
        scales = content.array_records.get(ex.SCALES)
        bytes_in = record.count_bytes() + (scales.count_bytes() if scales else 0)
        rnd.record.costs.note(label, report.metrics.get(ex.SECONDS), bytes_in, node_id)
        digest = wire_digest(record)
        replayed = self.replays.replayed(digest)
        if replayed is not None:
            raise ReplyRejected(f"state identical to {replayed} (nothing trained, or a stale "
                                "replay)", for_site="state identical to an earlier state of "
                                "this run (nothing trained, or a stale replay)")
        norms, spilled = self._decode_validate_spill(record, scales, rnd, label)
        result = SiteResult(node_id, label, report, math.sqrt(sum(n * n for n in norms.values())),
                            bytes_in, norms, digest=digest)
        rnd.held.append((result, spilled))
        rnd.spills.append(spilled)
        return result

    @torch.no_grad()
    def _decode_validate_spill(self, record: ArrayRecord, scales: ArrayRecord | None,
                               rnd: RoundState, label: str
                               ) -> tuple[dict[str, float], SpilledState]:
        """Decode, check and park a reply one tensor at a time; returns its norms per part.

        Raises ``ReplyRejected`` naming the first problem: missing or unexpected tensors, a
        tensor that does not decode under the announced codec (dtype, shape, scales), a
        non-finite value, a center coordinate outside the head's range, or a part's update norm
        above its bound for the round.
        """
        reference = rnd.reference
        sq = dict.fromkeys(PARTS, 0.0)
        sampler = rnd.sampler
        sample = sampler.empty()
        delta_norms: dict[str, float] = {}  # an int8 update's norms come with its decoding
        writer = SpillWriter(self.spill_dir / f"round{rnd.round_num}-{uuid.uuid4().hex}.f32")
        try:
            payload = Payload(record_tensors(record),
                              None if scales is None else record_tensors(scales))
            for name, value in self.link.receive_update(payload, reference, delta_norms):
                # The norm doubles as the finiteness check (check_finite).
                norm = delta_norms.pop(name, None)
                if norm is None:
                    norm = float(torch.linalg.vector_norm(value - reference[name].float()))
                check_finite(name, value, norm)
                if name == ex.CENTER_KEY and self.limits.derived:
                    check_center(value)
                sq[part_of(name)] += norm * norm
                sampler.take(sample, name, value)
                writer.add(name, value)
            norms = {part: math.sqrt(v) for part, v in sq.items()}
            check_trained(norms)
            check_part_norms(norms, rnd.bounds, self.limits.max_update_norm)
            replay = self.replays.near_replay(sample, rnd.sent_sample, rnd.global_sample)
            if replay is not None:
                raise ReplyRejected(replay)
        except codec.CodecError as e:  # it does not decode under the announced codec
            writer.abort()
            raise ReplyRejected(str(e)) from None
        except BaseException:
            writer.abort()
            raise
        return norms, writer.finish()
