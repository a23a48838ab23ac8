"""The one pseudo-random generator: the ChaCha20 keystream of a 32-byte key.

Masks, self masks and the rounding noise are all expanded here, from keys of 256 bits made by
X25519 + HKDF-SHA256 or by ``secrets`` (never ``random``, never numpy's generators, whose 32- to
128-bit seeds can be searched). The 16-byte ChaCha20 nonce of :mod:`cryptography` is a 4-byte
block counter (starting at 0) and a 12-byte nonce; the nonce is a fixed tag per purpose, so one
key drawn for one purpose gives an unrelated stream for another. Each key is fresh per round
(and per pair of sites), so a fixed nonce never repeats a (key, nonce) pair.
"""

from __future__ import annotations

from collections.abc import Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["KEY_BYTES", "PURPOSES", "keystream", "keystream_chunks"]

KEY_BYTES = 32
PURPOSES = {  # purpose -> 12-byte nonce
    "pair_mask": b"pairmask\x00\x00\x00\x01",
    "self_mask": b"selfmask\x00\x00\x00\x01",
    "rounding": b"rounding\x00\x00\x00\x01",
}
_MAX_BYTES = 64 * 2**32  # ChaCha20's 32-bit block counter


def _encryptor(key: bytes, purpose: str):
    if len(key) != KEY_BYTES:
        raise ValueError(f"a PRG key is {KEY_BYTES} bytes, got {len(key)}")
    nonce = PURPOSES.get(purpose)
    if nonce is None:
        raise ValueError(f"unknown PRG purpose {purpose!r}; expected one of {sorted(PURPOSES)}")
    return Cipher(algorithms.ChaCha20(key, b"\x00" * 4 + nonce), mode=None).encryptor()


def keystream(key: bytes, nbytes: int, purpose: str) -> bytes:
    """The first ``nbytes`` of the keystream of ``key`` for ``purpose``."""
    return next(keystream_chunks(key, nbytes, purpose, chunk=max(nbytes, 1)), b"")


def keystream_chunks(key: bytes, nbytes: int, purpose: str, chunk: int) -> Iterator[bytes]:
    """The same keystream as :func:`keystream`, in pieces of ``chunk`` bytes (the last shorter).

    Lets a caller add a mask to a vector of hundreds of MB without holding the whole mask.
    """
    if nbytes > _MAX_BYTES:
        raise ValueError(f"{nbytes} bytes exceed ChaCha20's {_MAX_BYTES} per key")
    enc = _encryptor(key, purpose)
    done = 0
    while done < nbytes:
        size = min(chunk, nbytes - done)
        yield enc.update(bytes(size))
        done += size
