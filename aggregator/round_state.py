"""One round at the coordinator: what was sent, the replies parked until it closes, and what
became of each reply.

The strategy (:mod:`aggregator.strategy`) starts a :class:`RoundState` with every
``configure_train`` and reads it until the next: the tensors the round's replies are decoded and
checked against, the replies that passed the per-reply checks (decoded, on disk until
``close_round``), the decision each node hears, and the
:class:`~aggregator.run_summary.RoundRecord` its rounds.jsonl row is built from (with the bytes
each instruction took).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aggregator.run_summary import RoundRecord

if TYPE_CHECKING:
    import torch

    from aggregator.averaging import Aggregator
    from aggregator.replays import CoordinateSample
    from aggregator.run_summary import SiteResult
    from aggregator.spill import SpilledState
    from aggregator.verdicts import SiteVerdict

__all__ = ["RoundState"]


@dataclass
class RoundState:
    """One round at the coordinator, from ``configure_train`` to the next round's."""

    round_num: int
    global_state: Mapping[str, torch.Tensor]
    aggregator: Aggregator
    # What was sent, and what each reply is decoded and checked against: the tensors that
    # travel (all, or without teacher.* with a site-local teacher), each part's norm bound, and
    # coordinate samples (aggregator/replays.py) of the state the sites decode and of the global
    # state their updates are added to (they differ by the codec's rounding).
    reference: Mapping[str, torch.Tensor] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)  # per part, ReplyLimits.part_bounds
    sampler: CoordinateSample | None = None
    sent_sample: dict[str, torch.Tensor] = field(default_factory=dict)
    global_sample: dict[str, torch.Tensor] = field(default_factory=dict)
    # node id -> what that site is told about its reply (aggregator/verdicts.py)
    verdicts: dict[int, SiteVerdict] = field(default_factory=dict)
    # Replies that passed the per-reply checks, decoded and parked on disk until close_round.
    held: list[tuple[SiteResult, SpilledState]] = field(default_factory=list)
    spills: list[SpilledState] = field(default_factory=list)  # all parked this round
    closed: bool = False
    record: RoundRecord = field(init=False)  # what became of each reply: the round's row

    def __post_init__(self) -> None:
        self.record = RoundRecord(self.round_num)
