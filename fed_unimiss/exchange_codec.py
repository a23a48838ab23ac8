"""How the exchanged state travels: half-precision transport, int8 deltas, a site-local teacher.

The tensor arithmetic of every codec. Both sides call it through one exchange object
(:class:`fed_unimiss.exchange_link.Exchange`), which decides which codec applies, so the
encoding cannot drift between them. The federation YAML's ``exchange:`` section
(:class:`ExchangeConfig`) picks one codec per direction and announces it in every instruction
(:data:`CONFIG_KEYS`); a site that does not know a codec refuses the round, it never guesses.

- ``down`` (global state to the sites): ``fp32`` as it is, or ``bf16`` / ``fp16`` full tensors.
  bf16 travels as its raw 16 bits in an int16 array (numpy has no bfloat16). ``q8_delta``: the
  aggregator and every site hold the same *base*, a bf16-valued copy of the global state that
  trails it by one rounding. Each round only ``global - base`` travels, as int8 blocks, and both
  sides advance the base by exactly the same arithmetic (:func:`advance_base`); a digest of the
  new base travels with it, so a site that applied it to anything else knows at once. What the
  rounding leaves out stays in ``global - base`` and goes with the next round's delta: error
  feedback on the aggregator's side. A site without the base (new, restarted, or one that missed
  a round) gets the base in full, as bf16 (:func:`base_bits`).
- ``up`` (a site's new state back): ``fp32`` / ``bf16`` / ``fp16`` full tensors, or ``q8_delta``:
  the update against the state the site received, in blocks of :data:`BLOCK` values sharing one
  float32 scale, rounded to int8. The rounding error is carried into the site's next update
  (error feedback, Seide et al. 2014; Karimireddy et al. 2019), so nothing is lost over rounds,
  only delayed. The residual is site-local memory and never travels.
- ``teacher``: ``exchanged`` (the teacher travels both ways, the method of the paper) or
  ``local``: each site keeps its own teacher between rounds, an EMA of its own students, and
  only student and center travel. That is a change of the method, not a lossless encoding
  (docs/benchmarks.md, "Rounds at the speed of the network").

The aggregator decodes every update before it validates it (shape, finite, norm) and adds a
``q8_delta`` update to its own fp32 global state; a reply that does not decode is rejected with
:class:`CodecError`'s reason. Checkpoints are written from the decoded fp32 state.

Pure torch, no flwr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from fed_unimiss.exchange import (
    EXCHANGE_BASE,
    EXCHANGE_BASE_CODEC,
    EXCHANGE_BASE_PREV,
    EXCHANGE_LAYOUT,
    SCALES,
)
from fed_unimiss.exchange_config import (
    CONFIG_KEYS,
    DOWN_CODECS,
    TEACHER_MODES,
    UP_CODECS,
    CodecError,
    ExchangeConfig,
    describe,
    sent_keys,
)

__all__ = ["ExchangeConfig", "CodecError", "CONFIG_KEYS", "DOWN_CODECS", "UP_CODECS",
           "TEACHER_MODES", "BLOCK", "SCALES", "PACKED", "PACKED_SCALES", "BASE_CODECS",
           "sent_keys", "describe", "encode_tensor", "decode_tensor", "quantise", "dequantise",
           "encode_update", "decode_update_tensor", "layout", "layout_to_json", "layout_from_json",
           "pack_state", "unpack_state", "pack_update", "unpack_update", "bf16_round",
           "base_delta", "advance_base", "base_bits", "base_from_bits", "base_digest",
           "receive_base"]

BLOCK = 256  # values per int8 block, one float32 scale each: 1.6 % overhead

_WIRE_DTYPE = {"fp32": torch.float32, "bf16": torch.int16, "fp16": torch.float16}


# ---------------------------------------------------------------- full tensors

def encode_tensor(t: torch.Tensor, codec: str) -> torch.Tensor:
    """One fp32 tensor as it travels with ``codec`` (fp32, bf16 bits as int16, fp16)."""
    t = t.detach().cpu()
    if codec == "fp32":
        return t.to(torch.float32).contiguous()
    if codec == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16)
    if codec == "fp16":
        return t.to(torch.float16).contiguous()
    raise CodecError(f"unknown codec {codec!r}")


def decode_tensor(name: str, wire: torch.Tensor, codec: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 tensor ``name`` from its wire form; ``CodecError`` if dtype or shape is wrong."""
    expected = _WIRE_DTYPE.get(codec)
    if expected is None:
        raise CodecError(f"unknown codec {codec!r}")
    if wire.dtype != expected:
        raise CodecError(f"{name}: dtype {wire.dtype} does not match the codec {codec} "
                         f"(expected {expected})")
    if tuple(wire.shape) != tuple(shape):
        raise CodecError(f"{name}: shape {tuple(wire.shape)} != expected {tuple(shape)}")
    if codec == "bf16":
        return wire.view(torch.bfloat16).to(torch.float32)
    return wire.to(torch.float32)


# ---------------------------------------------------------------- int8 deltas

def _blocks(numel: int) -> int:
    return max(1, math.ceil(numel / BLOCK))


def _as_blocks(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` as (blocks, BLOCK): a view when it fills whole blocks, else a zero-padded copy."""
    n = flat.numel()
    if n and n % BLOCK == 0:
        return flat.view(-1, BLOCK)
    padded = torch.zeros(_blocks(n) * BLOCK, dtype=torch.float32)
    padded[:n] = flat
    return padded.view(-1, BLOCK)


def quantise(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values of length blocks x BLOCK, float32 scale per block) of a float tensor."""
    blocks = _as_blocks(delta.detach().reshape(-1).to(torch.float32))
    scales = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).div_(127.0)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.div(blocks, safe[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(-1), scales


def dequantise(q: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    values = q.to(torch.float32).view(-1, BLOCK).mul_(scales[:, None])
    return values.view(-1)[:n].view(shape)


def encode_update(new: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                  codec: str, keys: Iterable[str],
                  residual: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A site's reply tensors (and q8 scales) for ``keys``.

    ``received`` is the decoded state the site started from. With ``q8_delta`` the update
    ``new - received`` plus the carried ``residual`` is quantised and ``residual`` is updated in
    place with what the rounding lost (error feedback); other codecs send full tensors.
    """
    if codec != "q8_delta":
        return {k: encode_tensor(new[k], codec) for k in keys}, {}
    wire, scales = {}, {}
    for k in keys:
        delta = torch.sub(new[k].detach().cpu().to(torch.float32), received[k].to(torch.float32))
        if residual is not None and k in residual and residual[k].shape == delta.shape:
            delta.add_(residual[k])
        q, s = quantise(delta)
        wire[k], scales[k] = q, s
        if residual is not None:  # what the rounding lost, in the delta's own buffer
            residual[k] = delta.sub_(dequantise(q, s, tuple(delta.shape)))
    return wire, scales


def decode_update_tensor(name: str, wire: torch.Tensor, scale: torch.Tensor | None, codec: str,
                         reference: torch.Tensor, delta_norms: dict[str, float] | None = None
                         ) -> torch.Tensor:
    """One tensor of a site's new state, fp32: full tensor, or ``reference`` + the int8 delta.

    ``reference`` is the aggregator's own fp32 global tensor. With ``q8_delta``, the delta's L2
    norm goes to ``delta_norms[name]`` when given (the aggregator's update norm, without a
    second pass over ``new - reference``). Raises ``CodecError``.
    """
    shape = tuple(reference.shape)
    if codec != "q8_delta":
        return decode_tensor(name, wire, codec, shape)
    blocks = _blocks(math.prod(shape))
    if wire.dtype != torch.int8 or tuple(wire.shape) != (blocks * BLOCK,):
        raise CodecError(f"{name}: expected int8 values of shape ({blocks * BLOCK},), got "
                         f"{wire.dtype} {tuple(wire.shape)}")
    if scale is None:
        raise CodecError(f"{name}: q8_delta scales missing")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (blocks,):
        raise CodecError(f"{name}: expected float32 scales of shape ({blocks},), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise CodecError(f"{name}: scales not finite and non-negative")
    delta = dequantise(wire, scale, shape)
    if delta_norms is not None:
        delta_norms[name] = float(torch.linalg.vector_norm(delta))
    return delta.add_(reference.to(torch.float32))


# ---------------------------------------------------------------- packed payloads
# Flower moves every array of a record as its own object (plus 5 MiB chunks), with a round trip
# per object on each of three hops: 415-830 small arrays cost seconds per round on loopback
# (docs/benchmarks.md). A compressed payload is therefore one flat array per record, the tensors
# concatenated in :func:`layout` order; only the uncompressed fp32 exchange keeps one array per
# tensor. The layout (names and shapes, no values) travels down in the instruction config.

PACKED = "packed"  # the single ArrayRecord key of a packed payload (and of its scales)


def layout(reference: Mapping[str, torch.Tensor], keys: Iterable[str]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every travelling tensor, in the packing order (sorted names)."""
    return [(k, tuple(reference[k].shape)) for k in sorted(keys)]


def layout_to_json(items: list[tuple[str, tuple[int, ...]]]) -> str:
    import json

    return json.dumps([[name, list(shape)] for name, shape in items], separators=(",", ":"))


def layout_from_json(text: str) -> list[tuple[str, tuple[int, ...]]]:
    import json

    try:
        items = [(str(name), tuple(int(d) for d in shape)) for name, shape in json.loads(text)]
    except (ValueError, TypeError) as e:
        raise CodecError(f"unreadable tensor layout ({e})") from None
    return items


def pack_state(state: Mapping[str, torch.Tensor], items: list[tuple[str, tuple[int, ...]]],
               codec: str) -> torch.Tensor:
    """The travelling tensors as one flat wire array (``codec`` bf16/fp16, or fp32)."""
    dtype = _WIRE_DTYPE.get(codec)
    if dtype is None:
        raise CodecError(f"unknown codec {codec!r}")
    flat = torch.empty(sum(math.prod(shape) for _, shape in items), dtype=dtype)
    start = 0
    for name, shape in items:  # written in place: no second copy of the payload
        n = math.prod(shape)
        flat[start:start + n] = encode_tensor(state[name], codec).reshape(-1)
        start += n
    return flat


def unpack_state(flat: torch.Tensor, items: list[tuple[str, tuple[int, ...]]], codec: str
                 ) -> dict[str, torch.Tensor]:
    """fp32 tensors from a packed wire array; ``CodecError`` if its dtype or length is wrong."""
    total = sum(math.prod(shape) for _, shape in items)
    expected = _WIRE_DTYPE.get(codec)
    if flat.dtype != expected or flat.dim() != 1 or flat.numel() != total:
        raise CodecError(f"packed {codec} payload: {flat.dtype} of {flat.numel()} values, "
                         f"expected {expected} of {total}")
    out, start = {}, 0
    for name, shape in items:
        n = math.prod(shape)
        out[name] = decode_tensor(name, flat[start:start + n].view(shape), codec, shape)
        start += n
    return out


def pack_update(new: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                codec: str, items: list[tuple[str, tuple[int, ...]]],
                residual: dict[str, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A site's packed reply: (values, scales or None); see :func:`encode_update`."""
    names = [name for name, _ in items]
    wire, scales = encode_update(new, received, codec, names, residual)
    values = torch.cat([wire[n].reshape(-1) for n in names])
    return values, (torch.cat([scales[n] for n in names]) if scales else None)


def unpack_update(values: torch.Tensor, scales: torch.Tensor | None, codec: str,
                  reference: Mapping[str, torch.Tensor],
                  delta_norms: dict[str, float] | None = None):
    """Yield (name, fp32 tensor) of a packed reply, one tensor at a time, in layout order.

    ``reference`` is the aggregator's fp32 global state of the travelling tensors;
    ``delta_norms`` as in :func:`decode_update_tensor`. Raises ``CodecError`` (before yielding
    anything) when a length or dtype is wrong.
    """
    items = layout(reference, reference.keys())
    q8 = codec == "q8_delta"
    sizes = [(_blocks(math.prod(s)) * BLOCK if q8 else math.prod(s)) for _, s in items]
    value_dtype = torch.int8 if q8 else _WIRE_DTYPE.get(codec)
    if values.dtype != value_dtype or values.dim() != 1 or values.numel() != sum(sizes):
        raise CodecError(f"packed {codec} update: {values.dtype} of {values.numel()} values, "
                         f"expected {value_dtype} of {sum(sizes)}")
    if q8:
        blocks = sum(size // BLOCK for size in sizes)
        if scales is None:
            raise CodecError("q8_delta scales missing")
        if scales.dtype != torch.float32 or scales.dim() != 1 or scales.numel() != blocks:
            raise CodecError(f"q8_delta scales: {scales.dtype} of {scales.numel()} values, "
                             f"expected float32 of {blocks}")
    start, block = 0, 0
    for (name, _), size in zip(items, sizes, strict=True):
        wire = values[start:start + size]
        if q8:
            nb = size // BLOCK
            yield name, decode_update_tensor(name, wire, scales[block:block + nb], codec,
                                             reference[name], delta_norms)
            block += nb
        else:
            yield name, decode_update_tensor(name, wire.view(tuple(reference[name].shape)),
                                             None, codec, reference[name])
        start += size


# ---------------------------------------------------------------- down: int8 deltas of a base

PACKED_SCALES = "packed_scales"  # the down delta's per-block scales, next to PACKED
BASE_CODECS = ("bf16", "fp32")  # how a full base travels


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest bfloat16, as float32: the first base, exact in bf16."""
    return t.detach().cpu().to(torch.float32).to(torch.bfloat16).to(torch.float32)


def base_delta(global_state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
               items: list[tuple[str, tuple[int, ...]]], *, advance: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The aggregator's side: ``global - base`` as packed int8 blocks and their scales.

    ``advance`` also moves ``base`` to the next base in place, tensor by tensor, with the same
    arithmetic as :func:`advance_base` (``base + dequantised``; float32 addition commutes
    exactly), so the aggregator needs no second pass and no second copy.
    """
    total = sum(_blocks(math.prod(shape)) for _, shape in items)
    values = torch.empty(total * BLOCK, dtype=torch.int8)
    scales = torch.empty(total, dtype=torch.float32)
    block = 0
    for name, shape in items:
        q, s = quantise(global_state[name].detach().cpu().to(torch.float32) - base[name])
        nb = s.numel()
        values[block * BLOCK:(block + nb) * BLOCK] = q
        scales[block:block + nb] = s
        block += nb
        if advance:
            base[name].add_(dequantise(q, s, shape))
    return values, scales


def advance_base(base: Mapping[str, torch.Tensor], values: torch.Tensor, scales: torch.Tensor,
                 items: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """The site's side: ``base + dequantised delta`` per tensor (float32), the next base.

    One float32 multiply and one float32 add per value, each exactly rounded by IEEE 754, so
    site and aggregator (:func:`base_delta` with ``advance``) compute the same bits. Raises
    ``CodecError`` when the payload does not fit ``items``.
    """
    missing = [name for name, _ in items if name not in base]
    if missing:
        raise CodecError(f"base lacks {len(missing)} tensor(s) of the layout: {missing[0]}")
    for name, shape in items:
        if tuple(base[name].shape) != shape:
            raise CodecError(f"{name}: base shape {tuple(base[name].shape)} != layout {shape}")
    return dict(unpack_update(values, scales, "q8_delta", {name: base[name] for name, _ in items}))


def base_bits(base: Mapping[str, torch.Tensor], items: list[tuple[str, tuple[int, ...]]],
              codec: str) -> torch.Tensor:
    """The whole base as one packed array: ``bf16`` (only while its values are bf16) or fp32."""
    if codec not in BASE_CODECS:
        raise CodecError(f"a base travels as {' or '.join(BASE_CODECS)}, not {codec!r}")
    return pack_state(base, items, codec)


def base_from_bits(flat: torch.Tensor, items: list[tuple[str, tuple[int, ...]]], codec: str
                   ) -> dict[str, torch.Tensor]:
    """The base from :func:`base_bits`; ``CodecError`` if codec, dtype or length is wrong."""
    if codec not in BASE_CODECS:
        raise CodecError(f"a base travels as {' or '.join(BASE_CODECS)}, not {codec!r}")
    return unpack_state(flat, items, codec)


def base_digest(base: Mapping[str, torch.Tensor], items: list[tuple[str, tuple[int, ...]]]
                ) -> str:
    """SHA-256 of the base's layout and float32 bits: what both sides check they hold."""
    import hashlib

    h = hashlib.sha256(layout_to_json(items).encode())
    for name, _ in items:
        h.update(base[name].detach().cpu().to(torch.float32).contiguous().numpy())
    return h.hexdigest()


def receive_base(flat: torch.Tensor, scales: torch.Tensor | None, config: Mapping[str, object],
                 held: tuple[Mapping[str, torch.Tensor], str] | None) -> dict[str, torch.Tensor]:
    """The receiving side of ``down: q8_delta``: the base a train instruction carries, checked.

    ``config`` is the instruction's config record. Without its previous-base digest the payload
    is the base in full; otherwise it is a delta for the base with that digest, applied to
    ``held`` (base, digest). Raises ``CodecError`` when the delta is for a base not held (a
    restarted worker) or the result's digest is not the announced one; the aggregator then
    sends the base in full next round.
    """
    items = layout_from_json(str(config.get(EXCHANGE_LAYOUT, "[]")))
    prev, announced = config.get(EXCHANGE_BASE_PREV), config.get(EXCHANGE_BASE)
    if prev is None:
        base = base_from_bits(flat, items, str(config.get(EXCHANGE_BASE_CODEC, "")))
    elif held is None or held[1] != prev:
        raise CodecError("the round's delta applies to a base this site does not hold "
                         "(restarted since the last round?); the next round sends it in full")
    elif scales is None:
        raise CodecError("q8_delta scales missing from the instruction")
    else:
        base = advance_base(held[0], flat, scales, items)
    if announced is not None and base_digest(base, items) != announced:
        raise CodecError("the decoded base differs from the one the aggregator announced; the "
                         "next round sends it in full")
    return base
