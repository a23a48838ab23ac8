"""Signed per-round keys: a key not signed by the site's identity is refused, naming the site."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from secagg_helpers import make_plan

from aggregator.provision import provision
from fed_unimiss.secure_aggregation import (
    AggregatorParty,
    KeyVerificationError,
    ProtocolError,
    SiteParty,
)
from fed_unimiss.secure_aggregation.keys import (
    EphemeralKeys,
    advert_message,
    load_identity_key,
    load_roster,
    roster_digest,
    sign_advert,
    verify_advert,
)


def test_an_advert_verifies_for_its_site_and_round_only(identities, roster):
    keys = EphemeralKeys.generate()
    advert = sign_advert(identities["site-a"], "r1", "site-a", keys)
    verify_advert(roster, "r1", "site-a", advert)
    with pytest.raises(KeyVerificationError, match="site 'site-a'.*does not verify"):
        verify_advert(roster, "r2", "site-a", advert)  # replayed in another round
    with pytest.raises(KeyVerificationError, match="site 'site-b'.*does not verify"):
        verify_advert(roster, "r1", "site-b", advert)  # passed off as another site's


def test_a_tampered_public_key_is_refused_naming_the_site(identities, roster):
    advert = sign_advert(identities["site-b"], "r1", "site-b", EphemeralKeys.generate())
    forged = dict(advert, mask_pk=EphemeralKeys.generate().mask_public())
    with pytest.raises(KeyVerificationError, match="site 'site-b'") as e:
        verify_advert(roster, "r1", "site-b", forged)
    assert e.value.site == "site-b"
    rogue = ec.generate_private_key(ec.SECP384R1())  # the aggregator signs its own keys
    with pytest.raises(KeyVerificationError, match="site 'site-b'"):
        verify_advert(roster, "r1", "site-b", sign_advert(rogue, "r1", "site-b",
                                                          EphemeralKeys.generate()))


def test_a_site_refuses_the_round_when_the_aggregator_swaps_a_peer_key(identities, roster):
    plan = make_plan(3)
    parties = {s: SiteParty(plan, s, identities[s], roster) for s in plan.sites}
    agg = AggregatorParty(plan)  # no roster: a dishonest aggregator skips its own check
    for s, p in parties.items():
        agg.receive_advert(s, p.advertise())
    adverts = agg.adverts()
    adverts["site-c"] = dict(adverts["site-c"], share_pk=EphemeralKeys.generate().share_public())
    with pytest.raises(KeyVerificationError, match="site 'site-c': advertised keys refused"):
        parties["site-a"].share_keys(adverts)


def test_a_site_refuses_keys_relayed_for_itself_that_are_not_its_own(identities, roster):
    plan = make_plan(3)
    parties = {s: SiteParty(plan, s, identities[s], roster) for s in plan.sites}
    adverts = {s: p.advertise() for s, p in parties.items()}
    adverts["site-a"] = sign_advert(identities["site-a"], plan.round_id, "site-a",
                                    EphemeralKeys.generate())
    with pytest.raises(ProtocolError, match="site 'site-a': the aggregator relayed keys"):
        parties["site-a"].share_keys(adverts)


def test_the_aggregator_with_a_roster_refuses_a_forged_advert_early(identities, roster):
    plan = make_plan(3)
    agg = AggregatorParty(plan, roster)
    wrong = sign_advert(identities["site-a"], plan.round_id, "site-b", EphemeralKeys.generate())
    with pytest.raises(KeyVerificationError, match="site 'site-b'"):
        agg.receive_advert("site-b", wrong)


def test_provisioned_kits_give_identities_and_a_roster(tmp_path):
    kits = provision(["north", "south", "east"], tmp_path / "kits")
    roster = load_roster(kits.coordinator / "site-keys")
    assert sorted(roster) == ["east", "north", "south"]
    identity = load_identity_key(kits.sites["north"] / "site.key")
    advert = sign_advert(identity, "r1", "north", EphemeralKeys.generate())
    verify_advert(roster, "r1", "north", advert)
    with pytest.raises(KeyVerificationError, match="site 'south'"):
        verify_advert(roster, "r1", "south", advert)
    assert roster_digest(roster) == roster_digest(load_roster(kits.coordinator / "site-keys"))
    assert len(roster_digest(roster)) == 64


def test_a_forged_seed_commitment_is_refused(identities, roster):
    advert = sign_advert(identities["site-b"], "r1", "site-b", EphemeralKeys.generate())
    with pytest.raises(KeyVerificationError, match="site 'site-b'"):
        verify_advert(roster, "r1", "site-b", dict(advert, seed_commitment=bytes(32)))


def test_a_signed_low_order_key_is_refused_naming_its_site(identities, roster):
    """A site that signs a degenerate X25519 key is named, not a crash of its peers."""
    plan = make_plan(3)
    parties = {s: SiteParty(plan, s, identities[s], roster) for s in plan.sites}
    adverts = {s: p.advertise() for s, p in parties.items()}
    bad = dict(adverts["site-c"], share_pk=bytes(32))  # the all-zero point: order 1
    bad["signature"] = identities["site-c"].sign(
        advert_message(plan.round_id, "site-c", bad["mask_pk"], bad["share_pk"],
                       bad["seed_commitment"]), ec.ECDSA(hashes.SHA384()))
    adverts["site-c"] = bad
    with pytest.raises(ProtocolError, match="site 'site-c': its share_pk gives no usable"):
        parties["site-a"].share_keys(adverts)
