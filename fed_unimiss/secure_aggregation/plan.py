"""What the aggregator announces before a secure round: its id, its sites, the threshold, the ring.

Every party of the round builds its side from the same :class:`RoundPlan`; it travels as plain
data (:meth:`RoundPlan.to_dict`), e.g. in the train instruction's config and array records.

The threshold ``t`` is the number of sites whose shares rebuild a secret. It must be more than
half the sites: an aggregator that tells two disjoint groups of sites different stories about
who dropped could otherwise collect both kinds of share of one site from the two groups. (The
active-adversary variant of Bonawitz et al., CCS 2017, adds a signed consistency round against
the same attack; see the package docstring.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fed_unimiss.secure_aggregation.ring import RingPlan

__all__ = ["RoundPlan", "min_threshold"]


def min_threshold(n_sites: int) -> int:
    """The smallest threshold this package accepts for ``n_sites``: a strict majority."""
    return n_sites // 2 + 1


@dataclass(frozen=True)
class RoundPlan:
    """One secure round: ``sites`` (sorted names), the threshold and the ring plan."""

    round_id: str  # unique per round and run (e.g. "<run id>/<round>"): binds keys and seeds
    sites: tuple[str, ...]  # the sites asked to take part, sorted
    threshold: int  # t: survivors needed to unmask; more than half of ``sites``
    ring: RingPlan

    def __post_init__(self) -> None:
        sites = tuple(sorted(self.sites))
        object.__setattr__(self, "sites", sites)
        if not self.round_id:
            raise ValueError("round plan: round_id is empty")
        if len(set(sites)) != len(sites):
            raise ValueError("round plan: a site is listed twice")
        if len(sites) < 2:
            raise ValueError(f"round plan: {len(sites)} site(s); secure aggregation needs two "
                             f"or more (one site's sum is its update)")
        low = min_threshold(len(sites))
        if not low <= self.threshold <= len(sites):
            raise ValueError(f"round plan: threshold {self.threshold} for {len(sites)} sites; "
                             f"it must be in [{low}, {len(sites)}] (a strict majority)")
        if self.ring.n_sites < len(sites):
            raise ValueError(f"round plan: the ring is sized for {self.ring.n_sites} sites, the "
                             f"round has {len(sites)}; the sum could overflow")

    def index(self, site: str) -> int:
        """The 1-based Shamir share index of ``site``."""
        return self.sites.index(site) + 1

    def to_dict(self) -> dict[str, object]:
        return {"round_id": self.round_id, "sites": list(self.sites),
                "threshold": self.threshold, "ring": self.ring.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RoundPlan:
        return cls(round_id=str(data["round_id"]), sites=tuple(str(s) for s in data["sites"]),
                   threshold=int(data["threshold"]), ring=RingPlan.from_dict(data["ring"]))
