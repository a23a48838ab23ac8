"""What the aggregator announces before a secure round: its id, its sites, the threshold, the ring.

Every party of the round builds its side from the same :class:`RoundPlan`; it travels as plain
data (:meth:`RoundPlan.to_dict`), e.g. in the train instruction's config and array records.

**Who masks with whom.** By default every site masks with every other and shares its secrets
with all of them (SecAgg, Bonawitz et al., CCS 2017): a site's work grows with the number of
sites, one pairwise mask per peer. With ``degree = k`` the sites sit on a circle in the plan's
``order`` and each masks with, and shares with, only its k nearest (k/2 each side: a Harary
graph, as SecAgg+ uses, Bell et al., CCS 2020): a site's work is k masks whatever the number of
sites. The graph is connected, so the aggregator still learns only the sum of all survivors.
The price is collusion: the aggregator learns a site's update if it colludes with ``t`` of that
site's k neighbours, not ``t`` of all the sites. ``order`` is a random permutation drawn by the
aggregator; an honest-but-curious aggregator draws it at random, a malicious one could seat
colluders next to a target (docs/privacy.md).

The threshold ``t`` is the number of sites whose shares rebuild a secret: it must be more than
half of the group that holds the shares (every site, or a site and its k neighbours): an
aggregator that tells two disjoint groups of sites different stories about who dropped could
otherwise collect both kinds of share of one site from the two groups. (The active-adversary
variant of Bonawitz et al. adds a signed consistency round against the same attack; see the
package docstring.)
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from fed_unimiss.secure_aggregation.ring import RingPlan

__all__ = ["RoundPlan", "min_threshold", "group_size", "harary_order"]


def min_threshold(n_sites: int, degree: int | None = None) -> int:
    """The smallest threshold this package accepts: a strict majority of the group that holds
    a site's shares (all ``n_sites``, or the site and its ``degree`` neighbours)."""
    return group_size(n_sites, degree) // 2 + 1


def harary_order(sites: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A uniformly random circle of ``sites`` (the OS's CSPRNG), for the neighbour graph."""
    order = list(sites)
    secrets.SystemRandom().shuffle(order)
    return tuple(order)


def group_size(n_sites: int, degree: int | None) -> int:
    """How many sites hold shares of one site's secrets (itself included)."""
    return n_sites if degree is None or degree >= n_sites - 1 else degree + 1


@dataclass(frozen=True)
class RoundPlan:
    """One secure round: ``sites`` (sorted names), the threshold, the ring plan, and (SecAgg+)
    the neighbour graph: ``degree`` neighbours each on the circle of ``order``."""

    round_id: str  # unique per round and run (e.g. "<run id>/<round>"): binds keys and seeds
    sites: tuple[str, ...]  # the sites asked to take part, sorted
    threshold: int  # t: shares that rebuild a secret; more than half of the group holding them
    ring: RingPlan
    degree: int | None = None  # k neighbours per site (even); None: every other site
    order: tuple[str, ...] = ()  # the circle the neighbours are taken on (a permutation)

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
        if self.degree is not None and self.degree >= len(sites) - 1:
            object.__setattr__(self, "degree", None)  # everyone's neighbour: plain SecAgg
        if self.degree is None:
            object.__setattr__(self, "order", ())
        else:
            if self.degree < 2 or self.degree % 2:
                raise ValueError(f"round plan: degree {self.degree}; it must be even and >= 2 "
                                 "(k/2 neighbours on each side of the circle)")
            if tuple(sorted(self.order)) != sites:
                raise ValueError("round plan: the neighbour order is not a permutation of the "
                                 "round's sites")
        group = group_size(len(sites), self.degree)
        low = min_threshold(len(sites), self.degree)
        if not low <= self.threshold <= group:
            raise ValueError(f"round plan: threshold {self.threshold} for groups of {group} "
                             f"sites; it must be in [{low}, {group}] (a strict majority)")
        if self.ring.n_sites < len(sites):
            raise ValueError(f"round plan: the ring is sized for {self.ring.n_sites} sites, the "
                             f"round has {len(sites)}; the sum could overflow")

    def index(self, site: str) -> int:
        """The 1-based Shamir share index of ``site``."""
        return self.sites.index(site) + 1

    def neighbours(self, site: str) -> frozenset[str]:
        """The sites ``site`` masks with and shares its secrets with (not itself)."""
        if self.degree is None:
            return frozenset(self.sites) - {site}
        n, at = len(self.order), self.order.index(site)
        return frozenset(self.order[(at + d) % n] for d in range(-self.degree // 2,
                                                                 self.degree // 2 + 1) if d)

    def to_dict(self) -> dict[str, object]:
        return {"round_id": self.round_id, "sites": list(self.sites),
                "threshold": self.threshold, "ring": self.ring.to_dict(),
                "degree": self.degree, "order": list(self.order)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RoundPlan:
        degree = data.get("degree")
        return cls(round_id=str(data["round_id"]), sites=tuple(str(s) for s in data["sites"]),
                   threshold=int(data["threshold"]), ring=RingPlan.from_dict(data["ring"]),
                   degree=None if degree is None else int(degree),
                   order=tuple(str(s) for s in data.get("order") or ()))
