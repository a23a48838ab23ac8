"""Length-prefixed byte strings: the one encoding of everything that is signed, derived or sealed.

Each field is its 4-byte big-endian length followed by its bytes, so no two different lists of
fields encode to the same bytes (``("ab", "c")`` and ``("a", "bc")`` differ), and a signature or
key derivation bound to a round and two site names cannot be replayed for another.
"""

from __future__ import annotations

import struct

__all__ = ["frame", "unframe"]


def _bytes(field: bytes | str | int) -> bytes:
    if isinstance(field, bytes):
        return field
    if isinstance(field, str):
        return field.encode("utf-8")
    if isinstance(field, int):
        return field.to_bytes(8, "big", signed=True)
    raise TypeError(f"cannot frame a {type(field).__name__}")


def frame(*fields: bytes | str | int) -> bytes:
    """The fields, each as its length and its bytes (str as UTF-8, int as 8 bytes)."""
    out = bytearray()
    for field in fields:
        data = _bytes(field)
        out += struct.pack(">I", len(data)) + data
    return bytes(out)


def unframe(data: bytes) -> list[bytes]:
    """The fields of :func:`frame` output; ``ValueError`` if ``data`` is not one."""
    fields, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError("truncated length prefix")
        (size,) = struct.unpack(">I", data[pos:pos + 4])
        pos += 4
        if pos + size > len(data):
            raise ValueError("truncated field")
        fields.append(data[pos:pos + size])
        pos += size
    return fields
