"""A site's side of one secure round: four calls, one per stage of Bonawitz et al. (CCS 2017).

::

    party = SiteParty(plan, "site-a", identity_key, roster)
    advert = party.advertise()                       # 1. advertise keys   -> aggregator
    sealed = party.share_keys(adverts)               # 2. share keys       -> aggregator
    masked = party.masked_input(inbox, ring_vector)  # 3. masked input     -> aggregator
                                     # (or party.open_inbox(inbox); party.mask(ring_vector))
    reveal = party.unmask(survivors)                 # 4. unmasking        -> aggregator

Every argument and result is plain data (bytes, dicts of bytes, a numpy ring vector), ready for a
Flower record. ``ring_vector`` comes from :func:`~fed_unimiss.secure_aggregation.ring.quantise`
and :func:`~fed_unimiss.secure_aggregation.ring.to_ring`; the site's part weights travel next to
the masked vector in the clear (the ring module says why).

A party lives for one round and holds its secrets in memory only. In deployment every message
may reach a fresh process, so the caller keeps the party between stages (or the whole round
runs in one process); a party that is lost just drops out, which the protocol tolerates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from fed_unimiss.secure_aggregation import shares as sh
from fed_unimiss.secure_aggregation.errors import (
    ProtocolError,
    RevealRefused,
    TooFewSurvivors,
)
from fed_unimiss.secure_aggregation.keys import (
    EphemeralKeys,
    sign_advert,
    verify_advert,
    x25519_agree,
)
from fed_unimiss.secure_aggregation.masks import apply_mask, pair_seed, pair_sign
from fed_unimiss.secure_aggregation.plan import RoundPlan

__all__ = ["SiteParty", "SELF_MASK", "MASK_KEY"]

SELF_MASK = "self_mask"  # a share of a peer's self-mask seed b_v: the peer uploaded
MASK_KEY = "mask_key"  # a share of a peer's mask secret key: the peer dropped before upload


def _agree(own: x25519.X25519PrivateKey, advert: Mapping[str, bytes], field: str,
           peer: str) -> bytes:
    """X25519 with a peer's advertised key; a low-order key is that peer's fault, named."""
    try:
        return x25519_agree(own, bytes(advert[field]))
    except ValueError as e:
        raise ProtocolError(f"its {field} gives no usable key agreement ({e})", site=peer) from e


class SiteParty:
    """One site in one secure round. Each stage method may be called once, in order."""

    def __init__(self, plan: RoundPlan, site: str, identity: ec.EllipticCurvePrivateKey,
                 roster: Mapping[str, ec.EllipticCurvePublicKey]):
        if site not in plan.sites:
            raise ValueError(f"site {site!r} is not in the round's sites {list(plan.sites)}")
        missing = [s for s in plan.sites if s not in roster]
        if missing:
            raise ValueError(f"the roster lacks site(s) {missing}: they cannot be verified")
        self.plan, self.site = plan, site
        self._identity, self._roster = identity, roster
        self._keys = EphemeralKeys.generate()
        self._stage = "advertise"
        self._advert: dict[str, bytes] = {}
        self._adverts: dict[str, Mapping[str, bytes]] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # peer -> (b share, key share) I hold
        self._peers: tuple[str, ...] = ()  # U2: the sites that shared keys with me (and me)
        self._revealed: dict[str, str] = {}  # peer -> SELF_MASK | MASK_KEY
        self._neighbours = plan.neighbours(site)  # whom it masks and shares with

    def _advance(self, expected: str, after: str) -> None:
        if self._stage != expected:
            raise ProtocolError(f"stage {expected!r} asked while at {self._stage!r}",
                                site=self.site)
        self._stage = after

    # ------------------------------------------------------------ 1. advertise keys
    def advertise(self) -> dict[str, bytes]:
        """This round's two public keys and self-mask seed commitment, signed with the site's
        identity key (:func:`~fed_unimiss.secure_aggregation.keys.sign_advert`)."""
        self._advance("advertise", "share_keys")
        self._advert = sign_advert(self._identity, self.plan.round_id, self.site, self._keys)
        return dict(self._advert)

    # ------------------------------------------------------------ 2. share keys
    def share_keys(self, adverts: Mapping[str, Mapping[str, bytes]]) -> dict[str, bytes]:
        """``{peer: sealed shares}`` for every advertised neighbour (U1; every other site
        unless the plan has a neighbour graph).

        Verifies every advertisement first (``KeyVerificationError`` naming the site), refuses
        an advertisement of this site that is not its own, and raises ``TooFewSurvivors`` when
        fewer than the threshold of its group (itself and its neighbours) advertised. Shares the
        self-mask seed and the mask secret key among them; the share for each peer is sealed so
        that only that peer can open it.
        """
        self._advance("share_keys", "masked_input")
        plan = self.plan
        strangers = sorted(set(adverts) - set(plan.sites))
        if strangers:
            raise ProtocolError(f"advertisements from sites outside the round: {strangers}",
                                site=self.site)
        own = adverts.get(self.site)
        if own is None or {k: bytes(v) for k, v in own.items()} != self._advert:
            raise ProtocolError("the aggregator relayed keys for this site that are not its "
                                "own", site=self.site)
        for peer in sorted(adverts):
            verify_advert(self._roster, plan.round_id, peer, adverts[peer])
        group = sorted(set(adverts) & (self._neighbours | {self.site}))
        if len(group) < plan.threshold:
            raise TooFewSurvivors("share_keys", len(group), plan.threshold)
        self._adverts = {peer: adverts[peer] for peer in group}
        n = len(plan.sites)
        b_shares = sh.split(self._keys.self_seed, plan.threshold, n)
        k_shares = sh.split(self._keys.mask_secret(), plan.threshold, n)
        sealed = {}
        for peer in group:
            i = plan.index(peer) - 1
            if peer == self.site:
                self._held[peer] = (b_shares[i], k_shares[i])
                continue
            key = sh.seal_key(_agree(self._keys.share, adverts[peer], "share_pk", peer),
                              plan.round_id, self.site, peer)
            sealed[peer] = sh.seal(key, plan.round_id, self.site, peer,
                                   sh.pack_shares(b_shares[i], k_shares[i]))
        return sealed

    # ------------------------------------------------------------ 3. masked input
    def masked_input(self, inbox: Mapping[str, bytes], ring_vector: np.ndarray) -> np.ndarray:
        """Stage 3 in one call: :meth:`open_inbox`, then :meth:`mask`."""
        self.open_inbox(inbox)
        return self.mask(ring_vector)

    def open_inbox(self, inbox: Mapping[str, bytes]) -> None:
        """Open the shares peers sealed for this site; their senders and this site are U2.

        ``inbox`` is ``{sender: sealed shares for this site}``, relayed by the aggregator; its
        senders must be advertised neighbours. A sealed share that does not open raises
        ``ProtocolError`` naming its sender. Cheap: a site can call it before it quantises, to
        fail fast.
        """
        self._advance("masked_input", "mask")
        plan = self.plan
        unknown = sorted(set(inbox) - set(self._adverts) - {self.site})
        if unknown:
            raise ProtocolError(f"shares from sites that did not advertise keys or are not "
                                f"its neighbours: {unknown}", site=self.site)
        for sender in sorted(set(inbox) - {self.site}):
            key = sh.seal_key(_agree(self._keys.share, self._adverts[sender], "share_pk",
                                     sender), plan.round_id, sender, self.site)
            plain = sh.open_sealed(key, plan.round_id, sender, self.site, bytes(inbox[sender]))
            self._held[sender] = sh.unpack_shares(plain)
        self._peers = tuple(sorted(set(inbox) | {self.site}))
        if len(self._peers) < plan.threshold:
            raise TooFewSurvivors("masked_input", len(self._peers), plan.threshold)

    def mask(self, ring_vector: np.ndarray) -> np.ndarray:
        """``ring_vector`` + self mask + the pairwise masks with every other site of U2.

        ``ring_vector`` comes from :func:`~fed_unimiss.secure_aggregation.ring.to_ring`; the
        result is what travels to the aggregator (it is uniform in the ring on its own).
        """
        self._advance("mask", "unmask")
        plan, ring = self.plan, self.plan.ring
        if ring_vector.dtype != ring.dtype or ring_vector.shape != (ring.size,):
            raise ValueError(f"ring vector: expected {ring.dtype} of shape ({ring.size},), got "
                             f"{ring_vector.dtype} {ring_vector.shape}")
        masked = ring_vector.copy()
        apply_mask(masked, self._keys.self_seed, ring, 1, "self_mask")
        for peer in self._peers:
            if peer == self.site:
                continue
            secret = _agree(self._keys.mask, self._adverts[peer], "mask_pk", peer)
            apply_mask(masked, pair_seed(secret, plan.round_id, self.site, peer), ring,
                       pair_sign(self.site, peer))
        return masked

    # ------------------------------------------------------------ 4. unmasking
    def unmask(self, survivors: Sequence[str]) -> dict[str, dict[str, bytes]]:
        """This site's shares for the aggregator: ``{SELF_MASK: {peer: share}, MASK_KEY: {...}}``.

        ``survivors`` (U3) are the sites whose masked input the aggregator counts. For each
        peer of U2 (the neighbours that shared keys with it) this site reveals the share of its
        self-mask seed if the peer survived, else the share of its mask key; never both for one
        peer (``RevealRefused``), also across repeated calls. Refuses a survivor list that names
        a neighbour that never shared keys with it or a site outside the round, that omits this
        site, or that leaves fewer than the threshold of its group (``TooFewSurvivors``).
        """
        if self._stage not in ("mask", "unmask", "done"):  # its inbox is open
            raise ProtocolError(f"stage 'unmask' asked while at {self._stage!r}",
                                site=self.site)
        survived = set(survivors)
        outside = sorted((survived & self._neighbours) - set(self._peers)) \
            + sorted(survived - set(self.plan.sites))
        if outside:
            raise ProtocolError(f"survivors {outside} never shared keys with this site",
                                site=self.site)
        if self.site not in survived:
            raise ProtocolError("this site is not among the survivors; it reveals nothing",
                                site=self.site)
        in_group = len(survived & set(self._peers))
        if in_group < self.plan.threshold:
            raise TooFewSurvivors("unmask", in_group, self.plan.threshold)
        wanted = {peer: (SELF_MASK if peer in survived else MASK_KEY) for peer in self._peers}
        for peer, kind in wanted.items():  # check all before revealing any
            before = self._revealed.get(peer, kind)
            if before != kind:
                raise RevealRefused(peer, before, kind)
        reveal: dict[str, dict[str, bytes]] = {SELF_MASK: {}, MASK_KEY: {}}
        for peer, kind in wanted.items():
            b_share, k_share = self._held[peer]
            reveal[kind][peer] = b_share if kind == SELF_MASK else k_share
            self._revealed[peer] = kind
        self._stage = "done"
        return reveal
