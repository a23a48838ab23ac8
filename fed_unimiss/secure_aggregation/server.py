"""The aggregator's side of one secure round: it relays, sums and unmasks, and reads no update.

::

    agg = AggregatorParty(plan)
    for site, advert in replies_1: agg.receive_advert(site, advert)
    adverts = agg.adverts()                    # -> every site of U1      (stage 1 closes)
    for site, sealed in replies_2: agg.receive_shares(site, sealed)
    inboxes = agg.inboxes()                    # -> inboxes[site] to each (stage 2 closes)
    for site, masked, weights in replies_3: agg.receive_masked(site, masked, weights)
    survivors = agg.survivors()                # -> every survivor        (stage 3 closes)
    for site, reveal in replies_4: agg.receive_unmask(site, reveal)
    result = agg.finish()                      # the weighted sum, unmasked

The aggregator holds only what Bonawitz et al. (CCS 2017) let it hold: signed public keys,
sealed shares it cannot open, a running sum of masked vectors (one vector's memory, whatever the
number of sites), each site's part weights (in the clear, see the ring module), and in the end
the unmasked sum. A masked vector is added to the sum on arrival and not kept.

A stage closes when the caller calls its closing method (at the round's deadline, with the
replies that arrived): a site that did not reply by then has dropped. Below the threshold,
every closing method raises :class:`~fed_unimiss.secure_aggregation.errors.TooFewSurvivors`,
which the round loop turns into "round failed, retry". Dropouts:

- a site that dropped before its masked input arrived (in U2, not U3): the survivors reveal
  shares of its mask key, and its pairwise masks are removed from the sum;
- a site that dropped after (in U3, silent at unmasking): nothing is lost, the survivors reveal
  shares of its self-mask seed like everyone else's.

Screening left in secure mode: the count bounds (each site's weights, checked on arrival, a site
out of bounds is refused and treated as dropped), the ring's L-infinity clip (set by the plan),
and checks on the aggregate itself (:attr:`AggregateResult.mean`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from fed_unimiss.secure_aggregation import shares as sh
from fed_unimiss.secure_aggregation.errors import ProtocolError, TooFewSurvivors
from fed_unimiss.secure_aggregation.keys import (
    seed_commitment,
    verify_advert,
    x25519_agree,
    x25519_public,
)
from fed_unimiss.secure_aggregation.masks import apply_mask, pair_seed, pair_sign
from fed_unimiss.secure_aggregation.plan import RoundPlan
from fed_unimiss.secure_aggregation.ring import PARTS, add_into, mean_update, signed_sum
from fed_unimiss.secure_aggregation.site import MASK_KEY, SELF_MASK

__all__ = ["AggregatorParty", "AggregateResult"]


@dataclass
class AggregateResult:
    """The round's outcome: the unmasked sum and what the aggregator may record."""

    ring_sum: np.ndarray  # the plan's dtype: sum of w_u q_u mod 2^k over the survivors
    weight_sums: dict[str, int]  # per part, over the survivors
    survivors: tuple[str, ...]  # U3: sites whose update is in the sum
    dropped_before_upload: tuple[str, ...]  # U2 \ U3: their pairwise masks were removed
    silent_at_unmask: tuple[str, ...]  # U3 \ U5: uploaded, then did not answer (harmless)
    plan: RoundPlan

    def levels(self) -> np.ndarray:
        """The sum in levels, signed int64 (exact while the ring plan's bound holds)."""
        return signed_sum(self.ring_sum, self.plan.ring)

    def mean(self) -> torch.Tensor:
        """The weighted mean update (flat float32), each part over its own weight sum."""
        return mean_update(self.ring_sum, self.plan.ring, self.weight_sums)


class AggregatorParty:
    """The aggregator in one secure round; see the module docstring for the call order."""

    def __init__(self, plan: RoundPlan,
                 roster: Mapping[str, ec.EllipticCurvePublicKey] | None = None):
        self.plan = plan
        self._roster = roster  # optional: refuse forged adverts early (the sites check anyway)
        self._stage = "advertise"
        self._adverts: dict[str, dict[str, bytes]] = {}
        self._sealed: dict[str, dict[str, bytes]] = {}  # sender -> {receiver: sealed}
        self._u2: tuple[str, ...] = ()
        self._sum = np.zeros(plan.ring.size, dtype=plan.ring.dtype)
        self._weights: dict[str, dict[str, int]] = {}
        self._u3: tuple[str, ...] = ()
        self._reveals: dict[str, Mapping[str, Mapping[str, bytes]]] = {}

    def _expect(self, stage: str, site: str | None = None) -> None:
        if self._stage != stage:
            raise ProtocolError(f"{stage!r} message while the round is at {self._stage!r}",
                                site=site)
        if site is not None and site not in self.plan.sites:
            raise ProtocolError("not a site of this round", site=site)

    def _close(self, stage: str, have: int, after: str) -> None:
        if have < self.plan.threshold:
            self._stage = "failed"
            raise TooFewSurvivors(stage, have, self.plan.threshold)
        self._stage = after

    # ------------------------------------------------------------ 1. advertise keys
    def receive_advert(self, site: str, advert: Mapping[str, bytes]) -> None:
        self._expect("advertise", site)
        if self._roster is not None:
            verify_advert(self._roster, self.plan.round_id, site, advert)
        self._adverts[site] = {k: bytes(v) for k, v in advert.items()}

    def adverts(self) -> dict[str, dict[str, bytes]]:
        """Close stage 1: every advertisement (U1), to send to every site of U1."""
        self._close("advertise", len(self._adverts), "share_keys")
        return dict(self._adverts)

    # ------------------------------------------------------------ 2. share keys
    def receive_shares(self, site: str, sealed: Mapping[str, bytes]) -> None:
        self._expect("share_keys", site)
        if site not in self._adverts:
            raise ProtocolError("shares from a site that did not advertise keys", site=site)
        expected = set(self._adverts) & self.plan.neighbours(site)
        if set(sealed) != expected:
            raise ProtocolError(f"sealed shares for {sorted(sealed)}, expected one for each of "
                                f"{sorted(expected)}", site=site)
        self._sealed[site] = {k: bytes(v) for k, v in sealed.items()}

    def inboxes(self) -> dict[str, dict[str, bytes]]:
        """Close stage 2: ``{receiver: {sender: sealed}}`` over U2, one inbox per site of U2
        (its neighbours' shares)."""
        self._close("share_keys", len(self._sealed), "masked_input")
        self._u2 = tuple(sorted(self._sealed))
        return {r: {s: self._sealed[s][r] for s in self._u2 if r in self._sealed[s]}
                for r in self._u2}

    # ------------------------------------------------------------ 3. masked input
    def receive_masked(self, site: str, masked: np.ndarray, weights: Mapping[str, int]) -> None:
        """Add ``site``'s masked vector to the running sum; its part weights are checked first.

        Raises ``ProtocolError`` (and adds nothing) for a site outside U2, a second vector, a
        wrong shape or dtype, or a weight outside [0, max_weight]: such a site is treated as
        dropped before upload.
        """
        self._expect("masked_input", site)
        ring = self.plan.ring
        if site not in self._u2:
            raise ProtocolError("masked input from a site that did not share keys", site=site)
        if site in self._weights:
            raise ProtocolError("a second masked input", site=site)
        if not isinstance(masked, np.ndarray) or masked.dtype != ring.dtype \
                or masked.shape != (ring.size,):
            raise ProtocolError(f"masked input is not {ring.dtype} of shape ({ring.size},)",
                                site=site)
        clean = {}
        for part in PARTS:
            w = weights.get(part, 0)
            if isinstance(w, bool) or not isinstance(w, int | np.integer) \
                    or not 0 <= int(w) <= ring.max_weight:
                raise ProtocolError(f"{part} weight {w!r} is outside [0, {ring.max_weight}] "
                                    f"(the count bounds)", site=site)
            clean[part] = int(w)
        if ring.bits < 8 * ring.dtype.itemsize and bool((masked > ring.mask).any()):
            raise ProtocolError(f"masked input exceeds the {ring.bits}-bit ring", site=site)
        add_into(self._sum, masked, ring)
        self._weights[site] = clean

    def survivors(self) -> list[str]:
        """Close stage 3: U3, the sites whose masked input is in the sum; send it to each."""
        self._close("masked_input", len(self._weights), "unmask")
        self._u3 = tuple(sorted(self._weights))
        return list(self._u3)

    # ------------------------------------------------------------ 4. unmasking
    def receive_unmask(self, site: str, reveal: Mapping[str, Mapping[str, bytes]]) -> None:
        self._expect("unmask", site)
        if site not in self._u3:
            raise ProtocolError("unmasking shares from a site that is not a survivor", site=site)
        if site in self._reveals:
            raise ProtocolError("a second set of unmasking shares", site=site)
        self_part = {k: bytes(v) for k, v in reveal.get(SELF_MASK, {}).items()}
        key_part = {k: bytes(v) for k, v in reveal.get(MASK_KEY, {}).items()}
        dropped = set(self._u2) - set(self._u3)
        if not set(self_part) <= set(self._u3) or not set(key_part) <= dropped:
            raise ProtocolError("shares of the wrong kind: self-mask shares are for survivors, "
                                "mask-key shares for sites dropped before upload", site=site)
        self._reveals[site] = {SELF_MASK: self_part, MASK_KEY: key_part}

    def _secret(self, kind: str, owner: str) -> bytes:
        """``owner``'s secret of ``kind``, rebuilt from the revealed shares and checked.

        Checked against what ``owner`` signed in its advertisement (its seed commitment, its
        mask public key). With more shares than the threshold, one bad share is outvoted:
        the shares are tried without each one in turn. Raises ``ProtocolError`` naming the
        owner when no combination checks out, ``TooFewSurvivors`` below the threshold.
        """
        t = self.plan.threshold
        shares = sorted((self.plan.index(holder), r[kind][owner])
                        for holder, r in self._reveals.items() if owner in r[kind])
        if len(shares) < t:
            raise TooFewSurvivors("unmask", len(shares), t)
        advert = self._adverts[owner]
        if kind == SELF_MASK:
            def good(secret: bytes) -> bool:
                return seed_commitment(secret, self.plan.round_id, owner) == \
                    advert["seed_commitment"]
        else:
            def good(secret: bytes) -> bool:
                return x25519_public(secret) == advert["mask_pk"]
        attempts = [shares[:t]]
        if len(shares) > t:  # leave each of the first t + 1 out in turn
            attempts += [(shares[:i] + shares[i + 1:])[:t] for i in range(t + 1)]
        for chosen in attempts:
            secret = sh.combine(dict(chosen), t)
            if good(secret):
                return secret
        raise ProtocolError(f"the {kind} secret rebuilt from {len(shares)} shares does not "
                            f"match what the site signed (a survivor revealed a bad share)",
                            site=owner)

    def finish(self) -> AggregateResult:
        """Close stage 4: remove every mask and return the sum (``TooFewSurvivors`` below t).

        Raises ``ProtocolError`` naming the site whose rebuilt secret does not match what it
        signed (survivors sent bad shares): the sum would be wrong.
        """
        self._close("unmask", len(self._reveals), "done")
        ring, plan = self.plan.ring, self.plan
        total = self._sum
        for owner in self._u3:
            apply_mask(total, self._secret(SELF_MASK, owner), ring, -1, "self_mask")
        dropped = tuple(s for s in self._u2 if s not in self._u3)
        for owner in dropped:
            secret = self._secret(MASK_KEY, owner)
            for survivor in sorted(set(self._u3) & plan.neighbours(owner)):
                shared = x25519_agree(secret, self._adverts[survivor]["mask_pk"])
                seed = pair_seed(shared, plan.round_id, survivor, owner)
                apply_mask(total, seed, ring, -pair_sign(survivor, owner))
        sums = {p: sum(self._weights[s][p] for s in self._u3) for p in PARTS}
        silent = tuple(s for s in self._u3 if s not in self._reveals)
        return AggregateResult(ring_sum=total, weight_sums=sums, survivors=self._u3,
                               dropped_before_upload=dropped, silent_at_unmask=silent,
                               plan=plan)
