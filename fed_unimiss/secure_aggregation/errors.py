"""The exceptions of secure aggregation, each naming the party or the numbers a person needs.

A round loop catches :class:`TooFewSurvivors` and treats it as "round failed, retry", exactly as
a round below ``min_sites``; every other :class:`SecureAggregationError` means a party
misbehaved (a forged key, a bad share, an out-of-order message) and is logged with its site.
Overflow of the ring is a configuration mistake and raises a plain ``ValueError``
(:mod:`fed_unimiss.secure_aggregation.ring`).
"""

from __future__ import annotations

__all__ = ["SecureAggregationError", "TooFewSurvivors", "KeyVerificationError", "RevealRefused",
           "ProtocolError"]


class SecureAggregationError(RuntimeError):
    """Base class: the round cannot go on as announced."""


class TooFewSurvivors(SecureAggregationError):
    """Fewer than the threshold of sites are left at ``stage``: the round fails and is retried.

    Nothing about any site's update can be recovered from what the aggregator holds then: the
    masks of fewer than ``threshold`` sites' shares cannot be removed.
    """

    def __init__(self, stage: str, have: int, need: int):
        self.stage, self.have, self.need = stage, have, need
        super().__init__(f"secure aggregation round failed at stage {stage!r}: {have} site(s) "
                         f"left, the threshold is {need}; retry the round")


class KeyVerificationError(SecureAggregationError):
    """A site's advertised public keys are not signed by that site's identity key."""

    def __init__(self, site: str, reason: str):
        self.site = site
        super().__init__(f"site {site!r}: advertised keys refused ({reason}); the keys did not "
                         f"come from that site's identity key, or the roster is wrong")


class RevealRefused(SecureAggregationError):
    """A site was asked for the second kind of share of one peer; it never reveals both.

    Revealing both the self-mask share and the pairwise-key share of one peer would let the
    aggregator strip every mask off that peer's vector (Bonawitz et al. 2017, section 4).
    """

    def __init__(self, peer: str, revealed: str, asked: str):
        self.peer = peer
        super().__init__(f"refused to reveal the {asked} share of site {peer!r}: its {revealed} "
                         f"share was already revealed this round, and both would unmask it")


class ProtocolError(SecureAggregationError):
    """A message that does not fit the round (wrong stage, wrong site, bad shape, bad share)."""

    def __init__(self, message: str, site: str | None = None):
        self.site = site
        super().__init__(f"site {site!r}: {message}" if site is not None else message)
