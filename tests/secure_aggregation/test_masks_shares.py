"""Mask seeds and their expansion, Shamir shares and their sealing: real crypto, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_helpers import make_ring

from fed_unimiss.secure_aggregation import ProtocolError
from fed_unimiss.secure_aggregation import shares as sh
from fed_unimiss.secure_aggregation.keys import EphemeralKeys, x25519_agree, x25519_public
from fed_unimiss.secure_aggregation.masks import apply_mask, expand, new_seed, pair_seed, pair_sign


def test_both_sides_derive_the_same_pair_seed_bound_to_round_and_pair():
    a, b, c = EphemeralKeys.generate(), EphemeralKeys.generate(), EphemeralKeys.generate()
    s_ab = pair_seed(x25519_agree(a.mask, b.mask_public()), "r1", "site-a", "site-b")
    assert s_ab == pair_seed(x25519_agree(b.mask, a.mask_public()), "r1", "site-b", "site-a")
    assert len(s_ab) == 32
    assert s_ab != pair_seed(x25519_agree(a.mask, b.mask_public()), "r2", "site-a", "site-b")
    assert s_ab != pair_seed(x25519_agree(a.mask, c.mask_public()), "r1", "site-a", "site-c")


def test_pair_masks_cancel_and_self_masks_differ_by_purpose():
    ring = make_ring(3, layout=((10_000, "shared"),), levels=3, max_weight=2, bits=16)
    seed = new_seed()
    total = np.zeros(ring.size, dtype=ring.dtype)
    apply_mask(total, seed, ring, pair_sign("site-a", "site-b"))
    assert bool(total.any())
    apply_mask(total, seed, ring, pair_sign("site-b", "site-a"))
    assert not total.any()
    assert not np.array_equal(expand(seed, ring, "pair_mask"), expand(seed, ring, "self_mask"))
    with pytest.raises(ValueError, match="no pairwise mask with itself"):
        pair_sign("site-a", "site-a")


@pytest.mark.parametrize("bits", [13, 16, 24])
def test_an_expanded_mask_is_uniform_in_the_ring(bits):
    ring = make_ring(2, layout=((40_000, "shared"),), levels=3, max_weight=2, bits=bits)
    m = expand(new_seed(), ring).astype(np.float64)
    assert m.max() < 2 ** bits
    # uniform on [0, 2^k): mean 2^(k-1), standard error 2^k / sqrt(12 n); 5 of them
    assert abs(m.mean() - 2 ** (bits - 1)) < 5 * 2 ** bits / np.sqrt(12 * m.size)
    counts = np.bincount((m * 16 / 2 ** bits).astype(int), minlength=16)
    chi2 = float(((counts - m.size / 16) ** 2 / (m.size / 16)).sum())
    assert chi2 < 45  # 15 degrees of freedom: P(chi2 > 45) ~ 1e-4


def test_shares_rebuild_a_32_byte_secret_from_any_threshold_of_them():
    secret = new_seed()
    shares = sh.split(secret, 3, 5)
    assert all(len(s) == 32 for s in shares)
    assert sh.combine({i: shares[i - 1] for i in (5, 2, 4)}, 3) == secret
    assert sh.combine({i: shares[i - 1] for i in (1, 2, 3, 4)}, 3) == secret
    assert sh.combine({i: shares[i - 1] for i in (1, 2)}, 2) != secret  # below t: garbage
    with pytest.raises(ValueError, match="2 shares, the threshold is 3"):
        sh.combine({1: shares[0], 2: shares[1]}, 3)


def test_a_rebuilt_mask_key_matches_its_public_key():
    keys = EphemeralKeys.generate()
    shares = sh.split(keys.mask_secret(), 2, 3)
    assert x25519_public(sh.combine({1: shares[0], 3: shares[2]}, 2)) == keys.mask_public()


def test_sealed_shares_open_only_for_their_receiver_and_round():
    a, b = EphemeralKeys.generate(), EphemeralKeys.generate()
    key_ab = sh.seal_key(x25519_agree(a.share, b.share_public()), "r1", "site-a", "site-b")
    blob = sh.seal(key_ab, "r1", "site-a", "site-b", sh.pack_shares(b"x" * 32, b"y" * 32))
    key_at_b = sh.seal_key(x25519_agree(b.share, a.share_public()), "r1", "site-a", "site-b")
    opened = sh.open_sealed(key_at_b, "r1", "site-a", "site-b", blob)
    assert sh.unpack_shares(opened) == (b"x" * 32, b"y" * 32)
    with pytest.raises(ProtocolError, match="site 'site-a': sealed shares do not open"):
        sh.open_sealed(key_at_b, "r2", "site-a", "site-b", blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(ProtocolError, match="do not open"):
        sh.open_sealed(key_at_b, "r1", "site-a", "site-b", tampered)
    reverse = sh.seal_key(x25519_agree(b.share, a.share_public()), "r1", "site-b", "site-a")
    assert reverse != key_ab  # each direction has its own key


def test_the_keystream_is_the_same_in_any_chunking():
    from fed_unimiss.secure_aggregation.prg import keystream, keystream_chunks

    key = new_seed()
    whole = keystream(key, 100_003, "pair_mask")
    assert b"".join(keystream_chunks(key, 100_003, "pair_mask", chunk=4097)) == whole
    assert keystream(key, 64, "self_mask") != whole[:64]
