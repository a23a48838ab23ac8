"""Pairwise and self masks: seeds from X25519 + HKDF-SHA256, vectors from ChaCha20.

Site u adds to its ring vector, for every peer v that shared keys this round,
``+PRG(s_uv)`` when u sorts before v and ``-PRG(s_uv)`` otherwise, so the pair's masks cancel in
the sum; plus ``PRG(b_u)``, its self mask, which the aggregator removes from the sum of the
sites that uploaded once enough survivors reveal shares of ``b_u`` (Bonawitz et al., CCS 2017,
section 4: without it, a site whose upload arrives late but is counted as dropped would be
unmasked by the pairwise-key shares alone).

- ``s_uv`` = HKDF-SHA256(X25519(u's mask key, v's mask key)), 32 bytes, bound to the round id
  and both site names (sorted), so a seed is never reused across rounds or pairs.
- ``b_u`` = 32 bytes from :mod:`secrets` (the OS's CSPRNG), fresh per round.
- Both are expanded by :func:`fed_unimiss.secure_aggregation.prg.keystream_chunks`.

Every seed is 256 bits; no ``random``, no numpy generator.
"""

from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fed_unimiss.secure_aggregation.framing import frame
from fed_unimiss.secure_aggregation.prg import KEY_BYTES, keystream_chunks
from fed_unimiss.secure_aggregation.ring import RingPlan

__all__ = ["pair_seed", "pair_sign", "new_seed", "expand", "apply_mask"]

_CONTEXT = b"fed-unimiss/secure-aggregation/v1/pair-mask"
_CHUNK_BYTES = 8 << 20  # keystream per step of apply_mask


def pair_seed(shared_secret: bytes, round_id: str, site_a: str, site_b: str) -> bytes:
    """The 32-byte mask seed of a pair (the same from either side)."""
    lo, hi = sorted((site_a, site_b))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=frame(_CONTEXT, round_id, lo, hi)).derive(shared_secret)


def pair_sign(own: str, peer: str) -> int:
    """+1 if ``own`` adds the pair's mask, -1 if it subtracts it (by sorted site names)."""
    if own == peer:
        raise ValueError(f"site {own!r} has no pairwise mask with itself")
    return 1 if own < peer else -1


def new_seed() -> bytes:
    """A fresh 32-byte self-mask seed from the OS's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def expand(seed: bytes, plan: RingPlan, purpose: str = "pair_mask") -> np.ndarray:
    """The mask of ``seed``: the plan's size of uniform integers mod 2^k, in the plan's dtype."""
    out = np.zeros(plan.size, dtype=plan.dtype)
    apply_mask(out, seed, plan, 1, purpose)
    return out


def apply_mask(vector: np.ndarray, seed: bytes, plan: RingPlan, sign: int,
               purpose: str = "pair_mask") -> None:
    """``vector += sign * PRG(seed)`` mod 2^k in place, a chunk of keystream at a time."""
    if vector.dtype != plan.dtype or vector.shape != (plan.size,):
        raise ValueError(f"expected {plan.dtype} of shape ({plan.size},), got {vector.dtype} "
                         f"{vector.shape}")
    width = plan.dtype.itemsize
    per_chunk = max(1, _CHUNK_BYTES // width)
    mask = plan.dtype.type(plan.mask)
    narrow = plan.bits < 8 * width
    start = 0
    for piece in keystream_chunks(seed, width * plan.size, purpose, chunk=per_chunk * width):
        m = np.frombuffer(piece, dtype=plan.dtype)
        view = vector[start:start + m.size]
        if sign > 0:
            np.add(view, m, out=view)
        else:
            np.subtract(view, m, out=view)
        if narrow:
            np.bitwise_and(view, mask, out=view)
        start += m.size
