"""What a site is told about its train reply: the coordinator's decision and why, for it alone.

A site that sent an update cannot see whether it was folded: the per-reply checks, the round's
screening and the replay guard all decide at the coordinator. Without this it would go on
training (and a DP site spending budget) on updates that are thrown away, and never know why.

The strategy keeps one :class:`SiteVerdict` per node and round (:mod:`aggregator.strategy`).
It travels

- in the node's next train instruction (config keys ``exchange.VERDICT_*``), for every node:
  the instruction is per node, and holds only that node's verdict;
- in the run's last message, of type ``query``, when the run ends (its last round, or a round
  that failed its quorum): only to nodes whose last update was not folded as sent (clipped or
  rejected), so an ordinary run's end costs no extra exchange (:func:`last_word_messages`).

The reason is the aggregator's own check with the reply's own numbers and the run's public
bounds. Where the recorded reason names another site's numbers or label (the round's median
norms and cosines, a replayed reply of another site), the site hears a text without them
(``Rejection.site_reason``, ``Verdict.site_reason``). A round-relative rejection still tells a
site that it stood out from the round; that much is the decision itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from aggregator.screening import ACCEPTED, CLIPPED, REJECTED
from fed_unimiss import exchange as ex

__all__ = ["SiteVerdict", "REFUSED", "ACCEPTED", "CLIPPED", "REJECTED", "with_verdict",
           "last_word_messages"]

# The site's own refusal or error reply (budget spent, DP settings, a failure): it said why itself.
REFUSED = "refused"


@dataclass(frozen=True)
class SiteVerdict:
    """The coordinator's decision on one node's train reply of one round."""

    round: int
    action: str  # accepted | clipped | rejected | refused
    reason: str = ""  # fit for that site (see the module docstring); empty when accepted

    @property
    def news(self) -> bool:
        """True when the site cannot know the decision by itself (its update was not folded
        as it sent it)."""
        return self.action in (CLIPPED, REJECTED)

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {ex.VERDICT_ROUND: self.round, ex.VERDICT_ACTION: self.action}
        if self.reason:  # Flower 1.39 cannot count the bytes of an empty string
            config[ex.VERDICT_REASON] = self.reason
        return config


def with_verdict(config: ConfigRecord, verdict: SiteVerdict | None) -> ConfigRecord:
    """``config`` for one node: a copy holding its verdict, or ``config`` itself if it has none."""
    if verdict is None:
        return config
    return ConfigRecord({**dict(config), **verdict.to_config()})


def last_word_messages(verdicts: Mapping[int, SiteVerdict]) -> list[Message]:
    """The run's last message to each node whose last update was clipped or rejected."""
    return [Message(RecordDict({ex.CONFIG: ConfigRecord(v.to_config())}), node_id, ex.QUERY,
                    group_id=f"{v.round}-verdict")
            for node_id, v in sorted(verdicts.items()) if v.news]
