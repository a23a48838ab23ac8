"""Shamir shares of a site's two secrets, and their encryption for the peer that holds them.

Each site splits its self-mask seed ``b_u`` and its mask secret key (both 32 bytes) into one
share per site of the round, threshold ``t``, so any ``t`` survivors can rebuild either secret
of a site that dropped (Bonawitz et al., CCS 2017). The field arithmetic is pycryptodome's
:class:`Crypto.Protocol.SecretSharing.Shamir` (GF(2^128), random coefficients from the OS):
it shares 16-byte secrets, so a 32-byte secret is split as two independent 16-byte halves with
the same share index, and a share is 32 bytes. A share's index is the holder's 1-based position
in the round's sorted site list.

Shares travel to their holder through the aggregator, sealed with ChaCha20-Poly1305 under a key
from the X25519 agreement of the two sites' *share* keys (HKDF-SHA256 bound to the round and the
direction sender -> receiver), with the round and both names as associated data: the aggregator
relays them but can neither read nor redirect them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fed_unimiss.secure_aggregation.errors import ProtocolError
from fed_unimiss.secure_aggregation.framing import frame, unframe

__all__ = ["SECRET_BYTES", "split", "combine", "seal_key", "seal", "open_sealed", "pack_shares",
           "unpack_shares"]

SECRET_BYTES = 32
_HALF = 16  # pycryptodome's Shamir shares 16-byte secrets
_CONTEXT = b"fed-unimiss/secure-aggregation/v1/share-seal"
_NONCE = 12


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """``holders`` shares (index i+1 at position i) of a 32-byte ``secret``; any ``threshold``
    of them rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a shared secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= holders:
        raise ValueError(f"threshold {threshold} must be in [1, {holders}]")
    lo = Shamir.split(threshold, holders, secret[:_HALF])
    hi = Shamir.split(threshold, holders, secret[_HALF:])
    return [a + b for (_, a), (_, b) in zip(lo, hi, strict=True)]


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from ``{index: share}``; uses exactly ``threshold`` of them (lowest indices).

    Raises ``ValueError`` with fewer shares than the threshold. A wrong share gives a wrong
    secret, never an error: callers check the result (a rebuilt key against its public key).
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, the threshold is {threshold}")
    chosen = sorted(shares.items())[:threshold]
    for index, share in chosen:
        if len(share) != 2 * _HALF:
            raise ValueError(f"share {index} is {len(share)} bytes, expected {2 * _HALF}")
    lo = Shamir.combine([(i, s[:_HALF]) for i, s in chosen])
    hi = Shamir.combine([(i, s[_HALF:]) for i, s in chosen])
    return lo + hi


def seal_key(shared_secret: bytes, round_id: str, sender: str, receiver: str) -> bytes:
    """The 32-byte AEAD key for shares from ``sender`` to ``receiver`` in ``round_id``."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=frame(_CONTEXT, round_id, sender, receiver)).derive(shared_secret)


def seal(key: bytes, round_id: str, sender: str, receiver: str, plaintext: bytes) -> bytes:
    """Random nonce + ChaCha20-Poly1305 ciphertext, the round and names as associated data."""
    nonce = os.urandom(_NONCE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext,
                                                 frame(round_id, sender, receiver))


def open_sealed(key: bytes, round_id: str, sender: str, receiver: str, blob: bytes) -> bytes:
    """The plaintext of :func:`seal`; ``ProtocolError`` naming the sender if it was altered."""
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:_NONCE], blob[_NONCE:],
                                             frame(round_id, sender, receiver))
    except (InvalidTag, ValueError):
        raise ProtocolError("sealed shares do not open (altered, or not for this round and "
                            "receiver)", site=sender) from None


def pack_shares(self_share: bytes, key_share: bytes) -> bytes:
    """The plaintext a site seals for one holder: its two shares."""
    return frame(self_share, key_share)


def unpack_shares(plaintext: bytes) -> tuple[bytes, bytes]:
    fields = unframe(plaintext)
    if len(fields) != 2:
        raise ValueError(f"expected 2 shares, got {len(fields)} fields")
    return fields[0], fields[1]
