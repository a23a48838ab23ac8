"""The exchange object: one side's end of the federation's exchange, built from the announced config.

Aggregator and site each hold one :class:`Exchange` per run, built from the same
``exchange:`` section (:class:`~fed_unimiss.exchange_config.ExchangeConfig`), and call it
symmetrically:

- down (the global state): the aggregator's :meth:`Exchange.send_state`, a site's
  :meth:`Exchange.receive_state`;
- up (a site's new state): a site's :meth:`Exchange.send_update`, the aggregator's
  :meth:`Exchange.receive_update`.

Every decision that depends on a codec's name is taken here, so a new codec touches this
module (and its tensor arithmetic in :mod:`fed_unimiss.exchange_codec`) and nothing else. What
the exchange remembers between rounds lives here too: the shared base of ``down: q8_delta`` and
its digest (both sides), the int8 residual of ``up: q8_delta`` and the ring residual of
``up: secure`` (error feedback, the site's) and the site's own teacher (``teacher: local``).

``up: secure`` sends no readable update: a site turns its update into a ring vector
(:meth:`Exchange.quantise_update`, with the round's announced ring plan) that the secure round
(:mod:`fed_unimiss.secure_aggregation`) masks, and the aggregator adds the unmasked weighted mean
to its state (:meth:`Exchange.add_mean`), as the plain path adds a decoded mean.

A :class:`Payload` is plain tensors: turning it into Flower records is the apps' business
(fed_unimiss never imports flwr).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fed_unimiss import exchange as ex
from fed_unimiss.exchange_codec import (
    PACKED,
    PACKED_SCALES,
    CodecError,
    ExchangeConfig,
    base_bits,
    base_delta,
    base_digest,
    bf16_round,
    decode_tensor,
    decode_update_tensor,
    encode_tensor,
    encode_update,
    layout,
    layout_from_json,
    layout_to_json,
    pack_state,
    pack_update,
    receive_base,
    sent_keys,
    unpack_state,
    unpack_update,
)
from fed_unimiss.secure_aggregation.ring import RingPlan, layout_from_classes, quantise, to_ring

__all__ = ["Exchange", "Payload", "Downlink"]

# The global state travels with this codec when the announced one is not a full-tensor codec
# (``q8_delta``: the first base, and every evaluation's full state).
_FIRST_BASE = "bf16"
_LATER_BASE = "fp32"  # a base that has left bf16 travels in full as fp32


@dataclass
class Payload:
    """What one direction carries, as plain tensors.

    ``arrays`` are the state's record (named tensors, or one packed array), ``scales`` the int8
    scales of an update (``None`` for the other codecs), ``config`` the instruction's exchange
    keys (layout, base digests). ``what`` names it for the replay guard (state, base, delta).
    """

    arrays: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor] | None = None
    config: dict[str, str] = field(default_factory=dict)
    what: str = "state"


class Downlink:
    """One round's global state as it travels to the sites.

    Every node gets the same payload, except with a shared base: a node that holds the previous
    base gets the int8 delta, every other node the new base in full (built once, when first
    needed).
    """

    def __init__(self, full: Callable[[], Payload], codec: str, *, delta: Payload | None = None,
                 previous: str | None = None, digest: str | None = None,
                 base: Mapping[str, torch.Tensor] | None = None):
        self._make_full = full
        self._full: Payload | None = None
        self._codec = codec
        self.delta = delta
        self.previous = previous  # the digest a node must hold to be sent the delta
        self.digest = digest  # the base every node holds once it decoded its payload, or None
        self._base = base

    def for_node(self, held: str | None) -> Payload:
        """The payload for a node that holds the base with digest ``held`` (None: no base)."""
        if self.delta is not None and held == self.previous:
            return self.delta
        if self._full is None:
            self._full = self._make_full()
        return self._full

    def payloads(self) -> list[Payload]:
        """The distinct payloads handed out so far (the replay guard remembers each)."""
        return [p for p in (self.delta, self._full) if p is not None]

    def received_sample(self, sample_of: Callable[[Mapping[str, torch.Tensor]], dict],
                        global_sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The coordinate sample of the state the sites decode (the replay guard's).

        With a base it is the base's sample; a full-tensor codec rounds every value on its own,
        so the global sample rounded as the codec rounds it is enough (no pass over the state).
        """
        if self._base is not None:
            return sample_of(self._base)
        return {part: _round_trip(v, self._codec).to(torch.float64)
                for part, v in global_sample.items()}


def _round_trip(t: torch.Tensor, codec: str) -> torch.Tensor:
    return decode_tensor("sample", encode_tensor(t, codec), codec, tuple(t.shape))


@dataclass
class _Base:
    """A base both sides hold (``down: q8_delta``): fp32 tensors, digest, layout JSON."""

    tensors: dict[str, torch.Tensor]
    digest: str
    layout: str


class Exchange:
    """One side's end of the exchange for one run (see the module docstring)."""

    def __init__(self, config: ExchangeConfig):
        self.config = config
        self._base: _Base | None = None
        self._holds: dict[object, str] = {}  # the aggregator's: node -> the base it holds
        self.residual: dict[str, torch.Tensor] = {}  # up q8_delta: what the rounding lost
        self.ring_residual: torch.Tensor | None = None  # up secure: what clip and rounding lost
        self.teacher: dict[str, torch.Tensor] = {}  # teacher local: the site's own teacher

    @classmethod
    def announced(cls, config: Mapping[str, object]) -> Exchange:
        """The exchange an instruction announces; ``CodecError`` if this code cannot honour it."""
        return cls(ExchangeConfig.from_config(config))

    def sent_keys(self, names: Iterable[str]) -> list[str]:
        """The tensors that travel (all, or all but the teacher when it stays at the sites)."""
        return sent_keys(names, self.config)

    @property
    def base_digest(self) -> str | None:
        """The digest of the base this side holds (``down: q8_delta``), or None."""
        return self._base.digest if self._base is not None else None

    def forget_base(self) -> None:
        """Hold no base: the next train instruction must bring it in full."""
        self._base = None

    def held_by(self, node: object) -> str | None:
        """The aggregator's side: the digest of the base ``node`` holds, or None."""
        return self._holds.get(node)

    def node_answered(self, node: object, ok: bool) -> None:
        """The aggregator's side: ``node`` answered this round's train instruction.

        With a shared base a site checks the base's digest before it trains, so an answer
        without an error means it now holds the base sent this round; an error means it may
        hold none, and the next round sends it the base in full.
        """
        if self._base is None:
            return
        if ok:
            self._holds[node] = self._base.digest
        else:
            self._holds.pop(node, None)

    # ------------------------------------------------------------------ a site's memory
    def memory(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What this side remembers between rounds, as (tensors, strings) to persist: the base
        (``down: q8_delta``) with its digest and layout, the residuals and the local teacher.

        At a site this is private to it (its residuals follow its own updates): it is written
        to the site's own state directory only, by the site's session.
        """
        tensors: dict[str, torch.Tensor] = {}
        strings: dict[str, str] = {}
        if self._base is not None:
            tensors.update({f"base/{k}": v for k, v in self._base.tensors.items()})
            strings.update(base_digest=self._base.digest, base_layout=self._base.layout)
        tensors.update({f"residual/{k}": v for k, v in self.residual.items()})
        if self.ring_residual is not None:
            tensors["ring_residual"] = self.ring_residual
        tensors.update({f"teacher/{k}": v for k, v in self.teacher.items()})
        return tensors, strings

    def restore(self, tensors: Mapping[str, torch.Tensor], strings: Mapping[str, str]) -> bool:
        """Take back what :meth:`memory` gave; returns whether the base came back.

        A base whose tensors do not hash to its recorded digest is dropped (the aggregator then
        sends it in full, as after any loss); the residuals and the teacher are taken as they are.
        """
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.residual = part("residual/")
        self.teacher = part("teacher/")
        self.ring_residual = tensors.get("ring_residual")
        base, digest = part("base/"), strings.get("base_digest")
        layout_json = strings.get("base_layout", "[]")
        if not base or digest is None:
            return False
        items = layout_from_json(layout_json)
        if sorted(base) != sorted(n for n, _ in items) or base_digest(base, items) != digest:
            return False
        self._base = _Base(base, digest, layout_json)
        return True

    # ------------------------------------------------------------------ down
    def send_state(self, state: Mapping[str, torch.Tensor], *, train: bool = True) -> Downlink:
        """The aggregator's side: the global state as it travels this round.

        ``down: q8_delta`` advances the shared base for a train instruction; an evaluation gets
        the state in full (bf16) and leaves the base alone.
        """
        keys = self.sent_keys(state)
        down = self.config.down
        if down == "q8_delta":
            if train:
                return self._send_base(state, keys)
            payload = _full_state(state, keys, _FIRST_BASE)
            payload.config[ex.EXCHANGE_BASE_CODEC] = _FIRST_BASE
            return Downlink(lambda: payload, _FIRST_BASE)
        payload = _full_state(state, keys, down)
        return Downlink(lambda: payload, down)

    def _send_base(self, state: Mapping[str, torch.Tensor], keys: list[str]) -> Downlink:
        """``down: q8_delta``: the int8 change of the base, and the new base in full.

        The first base is the global state rounded to bf16 and travels as bf16; later full
        bases travel as fp32 (the base has left bf16). After an aggregator restart or a layout
        change the base starts again.
        """
        items = layout(state, keys)
        layout_json = layout_to_json(items)
        old = self._base if self._base is not None and self._base.layout == layout_json else None
        if old is None:
            base = {name: bf16_round(state[name]) for name, _ in items}
            full_codec = _FIRST_BASE
        else:
            base = old.tensors  # advanced in place to the base the sites will rebuild
            values, scales = base_delta(state, base, items, advance=True)
            full_codec = _LATER_BASE
        digest = base_digest(base, items)
        self._base = _Base(base, digest, layout_json)
        delta = None
        if old is not None:
            delta = Payload({PACKED: values, PACKED_SCALES: scales},
                            config={ex.EXCHANGE_LAYOUT: layout_json, ex.EXCHANGE_BASE: digest,
                                    ex.EXCHANGE_BASE_PREV: old.digest}, what="delta")

        def full() -> Payload:
            return Payload({PACKED: base_bits(base, items, full_codec)},
                           config={ex.EXCHANGE_LAYOUT: layout_json, ex.EXCHANGE_BASE: digest,
                                   ex.EXCHANGE_BASE_CODEC: full_codec}, what="base")

        return Downlink(full, full_codec, delta=delta,
                        previous=old.digest if old is not None else None, digest=digest,
                        base=base)

    def receive_state(self, payload: Payload, *, train: bool = True) -> dict[str, torch.Tensor]:
        """A site's side: the travelling tensors of the global state, fp32.

        ``down: q8_delta``: a train instruction's base is kept for the next delta; an
        evaluation's full state is not a base. Raises ``CodecError``; then this side holds no
        base, and the aggregator sends it in full next round.
        """
        down = self.config.down
        if down == "q8_delta":
            return self._receive_base(payload, keep=train)
        if PACKED in payload.arrays:  # one flat array in the announced layout
            items = layout_from_json(str(payload.config.get(ex.EXCHANGE_LAYOUT, "[]")))
            return unpack_state(payload.arrays[PACKED], items, down)
        return {name: decode_tensor(name, wire, down, tuple(wire.shape))
                for name, wire in payload.arrays.items()}

    def _receive_base(self, payload: Payload, keep: bool) -> dict[str, torch.Tensor]:
        flat = payload.arrays.get(PACKED, torch.zeros(0, dtype=torch.float64))
        held = (self._base.tensors, self._base.digest) if self._base is not None else None
        try:
            base = receive_base(flat, payload.arrays.get(PACKED_SCALES), payload.config, held)
        except CodecError:
            self._base = None  # whatever it held is not the aggregator's: the full base comes next
            raise
        announced = payload.config.get(ex.EXCHANGE_BASE)
        if announced is not None and keep:
            self._base = _Base(base, str(announced),
                               str(payload.config.get(ex.EXCHANGE_LAYOUT, "[]")))
        return dict(base)  # shared with the base: training loads copies and never writes these

    def with_own_teacher(self, received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state a site trains from: ``received``, plus its own teacher when it stays local.

        In the first round (or after a restart) the teacher starts as the student, as DINO's does.
        """
        state = dict(received)
        if self.config.teacher != "local":
            return state
        for name in [n for n in state if n.startswith(ex.STUDENT_PREFIX)]:
            teacher = ex.TEACHER_PREFIX + name[len(ex.STUDENT_PREFIX):]
            kept = self.teacher.get(teacher)
            state[teacher] = kept if kept is not None and kept.shape == state[name].shape \
                else state[name].clone()
        return state

    # ------------------------------------------------------------------ up
    def send_update(self, new_state: Mapping[str, torch.Tensor],
                    received: Mapping[str, torch.Tensor]) -> Payload:
        """A site's side: its new state as it travels, against the state it ``received``.

        Keeps the site's own teacher (``teacher: local``) and, with ``up: q8_delta``, carries
        what the rounding lost into the next update.
        """
        self._keep_local_teacher(new_state)
        keys = self.sent_keys(list(new_state))
        up = self.config.up
        if self.config.masked:
            raise CodecError("up: secure sends no readable update; the secure round masks "
                             "quantise_update's ring vector")
        if up == "fp32":  # one array per tensor, named
            wire, _ = encode_update(new_state, received, up, keys)
            return Payload(wire)
        values, scales = pack_update(new_state, received, up, layout(new_state, keys),
                                     self.residual)
        return Payload({PACKED: values}, {PACKED: scales} if scales is not None else None)

    def receive_update(self, payload: Payload, reference: Mapping[str, torch.Tensor],
                       delta_norms: dict[str, float] | None = None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
        """The aggregator's side: (name, fp32 tensor) of a site's new state, one at a time.

        ``reference`` is the aggregator's fp32 state of the travelling tensors. An int8 update
        also leaves each tensor's update norm in ``delta_norms``. Raises ``CodecError`` naming
        the first problem (before yielding anything when the payload's shape is wrong).
        """
        up = self.config.up
        if self.config.masked:
            raise CodecError("up: secure: the aggregator receives masked vectors, not updates")
        if (payload.scales is not None) != (up == "q8_delta"):
            raise CodecError(f"undecodable update: int8 scales "
                             f"{'present' if payload.scales is not None else 'missing'} "
                             f"under the announced codec up={up}")
        if up == "fp32":
            yield from _named_update(payload.arrays, reference, up)
            return
        for arrays, what in ((payload.arrays, "values"), (payload.scales, "scales")):
            if arrays is not None and list(arrays) != [PACKED]:  # packed: one array each
                raise CodecError(f"undecodable update ({up}): {what} record must hold one "
                                 f"array {PACKED!r}")
        scale = payload.scales[PACKED] if payload.scales is not None else None
        try:
            yield from unpack_update(payload.arrays[PACKED], scale, up, reference, delta_norms)
        except CodecError as e:
            raise CodecError(f"undecodable update ({up}): {e}") from None

    def _keep_local_teacher(self, new_state: Mapping[str, torch.Tensor]) -> None:
        """Under ``teacher: local`` the site's teacher stays here between rounds."""
        if self.config.teacher == "local":
            self.teacher = {k: v.detach().cpu().clone() for k, v in new_state.items()
                            if k.startswith(ex.TEACHER_PREFIX)}

    # ------------------------------------------------------------------ up: secure
    @property
    def masked(self) -> bool:
        """True under ``up: secure``: updates travel masked, the aggregator reads only sums."""
        return self.config.masked

    def ring_items(self, state: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the travelling tensors in the masked vector's order (sorted names):
        student, teacher (when exchanged) and center, all in one vector."""
        return layout(state, self.sent_keys(list(state)))

    def ring_layout(self, state: Mapping[str, torch.Tensor], classes: Mapping[str, str]
                    ) -> tuple[tuple[int, str], ...]:
        """The aggregator's side: (size, part) per travelling tensor, for the round's ring plan
        (``classes``: tensor name -> 2d/3d/shared, the dimension-aware weights' parts)."""
        return layout_from_classes(self.ring_items(state), classes)

    def quantise_update(self, new_state: Mapping[str, torch.Tensor],
                        received: Mapping[str, torch.Tensor], ring: RingPlan,
                        weights: Mapping[str, int], seed: bytes) -> tuple[np.ndarray, int]:
        """A site's side under ``up: secure``: (ring vector, clipped coordinates) of its update.

        The update (``new_state - received`` over the travelling tensors) plus the residual of
        the last round is clipped and stochastically rounded to the announced ring plan, each
        part's levels multiplied by the site's weight of that part; what clip and rounding lost
        stays here for the next update (error feedback). Keeps the site's own teacher
        (``teacher: local``). Raises ``CodecError`` when the plan's layout is not this state's.
        """
        self._keep_local_teacher(new_state)
        items = self.ring_items(new_state)
        sizes = [math.prod(shape) for _, shape in items]
        if sizes != [size for size, _ in ring.layout]:
            raise CodecError(f"the announced ring layout ({len(ring.layout)} tensors, "
                             f"{ring.size} values) is not this site's state ({len(sizes)} "
                             f"tensors, {sum(sizes)} values)")
        flat = torch.cat([(new_state[name].detach().cpu().float()
                           - received[name].detach().cpu().float()).reshape(-1)
                          for name, _ in items])
        residual = self.ring_residual
        if residual is not None and residual.numel() != ring.size:
            residual = None  # a new layout: the old residual belongs to another model
        q = quantise(flat, ring, seed=seed, residual=residual)
        self.ring_residual = q.residual
        return to_ring(q.values, ring, dict(weights)), q.clipped

    def add_mean(self, state: Mapping[str, torch.Tensor], mean: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        """The aggregator's side under ``up: secure``: ``state`` plus the unmasked weighted mean
        update (flat, in :meth:`ring_items` order); a part no site weighted has a mean of 0."""
        out = dict(state)
        start = 0
        for name, shape in self.ring_items(state):
            n = math.prod(shape)
            out[name] = (state[name].float() + mean[start:start + n].reshape(shape)).to(
                state[name].dtype)
            start += n
        if start != mean.numel():
            raise CodecError(f"the mean update has {mean.numel()} values, the state {start}")
        return out

    def checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The aggregator's new global state as checkpointed: with a site-local teacher no
        teacher travelled, so the checkpoint's teacher is the new global student."""
        out = dict(state)
        if self.config.teacher != "local":
            return out
        for name in out:
            if name.startswith(ex.TEACHER_PREFIX):
                out[name] = out[ex.STUDENT_PREFIX + name[len(ex.TEACHER_PREFIX):]].clone()
        return out


def _full_state(state: Mapping[str, torch.Tensor], keys: list[str], codec: str) -> Payload:
    """Full tensors: fp32 one array per tensor (as Flower's own examples send it), the half
    precisions one packed array and its layout (names and shapes) for the instruction."""
    if codec == "fp32":  # one tensor at a time: no second copy of the whole state
        return Payload({k: encode_tensor(state[k], codec) for k in keys})
    items = layout(state, keys)
    return Payload({PACKED: pack_state(state, items, codec)},
                   config={ex.EXCHANGE_LAYOUT: layout_to_json(items)})


def name_mismatch(names: Iterable[str], expected: Iterable[str]) -> str | None:
    """What is wrong with a reply's tensor names against the expected ones, or None.

    Names only the first few missing tensors and only counts unexpected ones: an unexpected
    name is the sender's text and does not belong in the aggregator's log.
    """
    names, expected = set(names), list(expected)
    missing = [name for name in expected if name not in names]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        return f"{len(missing)} tensor(s) missing: {shown}"
    unexpected = len(names - set(expected))
    return f"{unexpected} unexpected tensor(s)" if unexpected else None


def _named_update(arrays: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                  up: str) -> Iterator[tuple[str, torch.Tensor]]:
    problem = name_mismatch(arrays, reference)
    if problem:
        raise CodecError(problem)
    for name, ref in reference.items():
        yield name, decode_update_tensor(name, arrays[name], None, up, ref)
