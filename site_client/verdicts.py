"""What this site hears about its last update: the coordinator's decision and its reason.

The aggregator sends the decision on this node's train reply in the node's next train
instruction, or, when the run ends, in a last message of type ``query`` (aggregator/verdicts.py;
config keys ``exchange.VERDICT_*``). An update that was rejected or clipped is news the site
cannot know by itself: the ClientApp shim says it on the site's terminal (``STATE/progress.jsonl``,
read by ``site start``) and in its log. An accepted update, or a round the site refused itself,
needs no line. This module imports neither torch nor Flower (the shim stays quick to start).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fed_unimiss import exchange as ex

__all__ = ["HeardVerdict", "heard_verdict"]

ACTIONS = ("accepted", "clipped", "rejected", "refused")
NEWS = ("clipped", "rejected")
MAX_REASON = 500  # characters of the coordinator's reason shown on the terminal


@dataclass(frozen=True)
class HeardVerdict:
    """The coordinator's decision on this site's train reply of ``round``."""

    round: int
    action: str
    reason: str

    @property
    def news(self) -> bool:
        return self.action in NEWS

    def line(self) -> str:
        """The site's log line (its terminal line is ``site start``'s, from progress.jsonl)."""
        verb = "REJECTED" if self.action == "rejected" else self.action
        return f"round {self.round}: the coordinator {verb} this site's update: {self.reason}"


def heard_verdict(config: Mapping[str, Any]) -> HeardVerdict | None:
    """The verdict an instruction carries, or None (none sent, or not one this site can read)."""
    round_num = config.get(ex.VERDICT_ROUND)
    action = config.get(ex.VERDICT_ACTION)
    reason = config.get(ex.VERDICT_REASON, "")
    if isinstance(round_num, bool) or not isinstance(round_num, int) or round_num < 1:
        return None
    if action not in ACTIONS or not isinstance(reason, str):
        return None
    reason = " ".join(reason.split())  # one line on the terminal
    if len(reason) > MAX_REASON:
        reason = reason[:MAX_REASON] + "..."
    return HeardVerdict(round_num, str(action), reason or "no reason given")
