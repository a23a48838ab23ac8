"""Replies that replay an old state instead of training: exact copies and near copies.

A site that sends back a global state it was sent, or a reply the aggregator accepted before,
trained nothing and pulls the model back. Two checks, both against what the aggregator sent or
folded in this run:

- **Exact.** A reply whose wire bytes have the SHA-256 of a state sent or a reply accepted
  earlier (32 B kept per state).
- **Near.** Under an int8 exchange a replayed state is re-encoded against the current round's
  state, so its bytes are new and only its values give it away: it lands next to the old state
  it replays (the int8 rounding is ~1 % of the distance it pulls back), while an honest update
  moves away from every earlier state. The aggregator keeps a fixed random sample of
  coordinates of every state it sent (:class:`CoordinateSample`, 8,192 values per part: 64 KB a
  round) and rejects a reply whose student or teacher lies within :data:`NEAR` x its own update
  of an earlier round's sent state, both measured on the sample. An adversary can add noise to
  escape this; its update then grows and meets the norm and direction checks.

What the guard remembers is written with the run after every round (:meth:`ReplayGuard.snapshot`,
``RUN/replays.safetensors``, aggregator/run_store.py) and taken back on resume, so an aggregator
restart does not open a window for replays of what came before it. Pure torch, no flwr.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from aggregator.validation import part_of

__all__ = ["NEAR", "SAMPLED_PARTS", "CoordinateSample", "ReplayGuard"]

# A reply is a near replay when its distance to an earlier sent state is at most NEAR x its
# distance to the state it was sent this round (its update). Measured with the shipped micro
# federation (int8 both ways, 4 sites, 4 and 20 local steps, 4-5 rounds): an int8-encoded
# replay of round 1's state sat at 0.0066 x its update; honest replies at 1.04 x and above
# (their distance to an older state includes the global model's movement since).
NEAR = 0.1
SAMPLED_PARTS = ("student", "teacher")
SAMPLES_PER_PART = 8192


class CoordinateSample:
    """A fixed random set of coordinates of the student and teacher of one layout.

    ``take`` gathers a tensor's sampled values as it streams past, so a reply that is decoded
    and parked on disk one tensor at a time is sampled without being read again.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], per_part: int = SAMPLES_PER_PART,
                 seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self._index: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}
        for part in SAMPLED_PARTS:
            names = sorted(n for n in shapes if part_of(n) == part)
            numels = torch.tensor([math.prod(shapes[n]) for n in names], dtype=torch.int64)
            total = int(numels.sum())
            if total == 0:
                continue
            k = min(per_part, total)
            picks = torch.randint(total, (k,), generator=gen).sort().values
            ends = numels.cumsum(0)
            owner = torch.searchsorted(ends, picks, right=True)  # which tensor holds each pick
            starts = ends - numels
            for i, name in enumerate(names):
                slots = (owner == i).nonzero().flatten()
                if slots.numel():
                    self._index[name] = (part, slots, picks[slots] - starts[i])
            self.sizes[part] = k

    def empty(self) -> dict[str, torch.Tensor]:
        return {part: torch.zeros(k, dtype=torch.float64) for part, k in self.sizes.items()}

    def take(self, into: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        """Write ``value``'s sampled coordinates into ``into`` (from :meth:`empty`)."""
        entry = self._index.get(name)
        if entry is not None:
            part, slots, flat_index = entry
            into[part][slots] = value.reshape(-1)[flat_index].to(torch.float64)

    def of(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sample of a whole state."""
        out = self.empty()
        for name in self._index:
            self.take(out, name, state[name])
        return out


class ReplayGuard:
    """What the run sent and accepted, to tell a replay from a trained reply (module docstring)."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}
        self._sent: list[tuple[str, dict[str, torch.Tensor]]] = []

    def remember(self, digest: str, what: str) -> None:
        self._seen.setdefault(digest, what)

    def replayed(self, digest: str) -> str | None:
        """What ``digest`` repeats (e.g. "the global state sent in round 1"), or None."""
        return self._seen.get(digest)

    def snapshot(self, pending: tuple[str, dict[str, torch.Tensor]] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Everything remembered, as (tensors, strings) to write with the run; ``pending`` is
        the current round's sent sample, which :meth:`remember_sent` only takes next round."""
        sent = self._sent + ([pending] if pending is not None else [])
        tensors = {f"sent/{i}/{part}": values.clone() for i, (_, sample) in enumerate(sent)
                   for part, values in sample.items()}
        return tensors, {"seen": json.dumps(self._seen, sort_keys=True),
                         "sent": json.dumps([what for what, _ in sent])}

    def restore(self, tensors: Mapping[str, torch.Tensor], strings: Mapping[str, str]) -> None:
        """Take back a :meth:`snapshot` (in place: the update checks share this guard)."""
        self._seen = {str(k): str(v) for k, v in json.loads(strings["seen"]).items()}
        whats = [str(w) for w in json.loads(strings["sent"])]
        self._sent = [(what, {key.rsplit("/", 1)[1]: value for key, value in tensors.items()
                              if key.startswith(f"sent/{i}/")})
                      for i, what in enumerate(whats)]

    def remember_sent(self, sample: dict[str, torch.Tensor], what: str) -> None:
        """Keep a sent state's coordinate sample; call once its round's replies are judged."""
        self._sent.append((what, sample))

    def near_replay(self, reply: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor],
                    decoded_against: Mapping[str, torch.Tensor]) -> str | None:
        """Why ``reply`` is a near copy of an earlier sent state, or None (all are samples).

        ``sent`` is the state the site was sent and trained from; ``decoded_against`` the state
        its update was added to when decoded (the full-precision global). The state the site
        itself sent back is ``reply - decoded_against + sent``, and that is what an earlier
        state the site was sent is compared with.
        """
        for part, values in reply.items():
            if part not in sent or part not in decoded_against:
                continue
            update = values - decoded_against[part]
            moved = float(torch.linalg.vector_norm(update))
            if moved == 0:
                continue  # nothing trained on this part: the exact checks' business
            site_state = update + sent[part]
            for what, old in self._sent:
                if part in old and old[part].shape == values.shape:
                    near = float(torch.linalg.vector_norm(site_state - old[part]))
                    if near <= NEAR * moved:
                        return (f"{part} lies {near / moved:.3g} x its update away from {what} "
                                f"(a stale replay; NEAR {NEAR:g})")
        return None
