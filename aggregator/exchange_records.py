"""Exchange payloads as Flower records and back: the aggregator's one adapter.

:mod:`fed_unimiss.exchange_link` works on plain tensors and never sees Flower; the strategy and
the attack grid move its :class:`~fed_unimiss.exchange_link.Payload` through messages with
these functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fed_unimiss import exchange as ex
from fed_unimiss.exchange_codec import CodecError
from fed_unimiss.exchange_link import Payload

__all__ = ["to_record", "record_tensors", "wire_digest", "instruction_payload", "reply_payload",
           "put_reply_payload"]


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Wire tensors -> ArrayRecord (one numpy array each, names kept)."""
    return ArrayRecord({k: Array(v.numpy()) for k, v in tensors.items()})


def wire_digest(record: ArrayRecord) -> str:
    """SHA-256 of the names and bytes of a record as sent (replay detection)."""
    h = hashlib.sha256()
    for name in sorted(record.keys()):
        h.update(name.encode())
        h.update(record[name].data)
    return h.hexdigest()


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors; ``CodecError`` for an array torch cannot hold."""
    out: dict[str, torch.Tensor] = {}
    for name in list(record.keys()):
        try:
            out[name] = torch.from_numpy(record[name].numpy())
        except (TypeError, ValueError) as e:
            raise CodecError(f"tensor {name} is not a numeric array") from e
    return out


def instruction_payload(content: RecordDict) -> Payload:
    """The global state of an instruction, with its config (layout, base digests)."""
    return Payload(record_tensors(content.array_records[ex.ARRAYS]),
                   config=dict(content.config_records[ex.CONFIG]))


def reply_payload(content: RecordDict) -> Payload:
    """A train reply's state and, for int8 updates, its scales."""
    scales = content.array_records.get(ex.SCALES)
    return Payload(record_tensors(content.array_records[ex.ARRAYS]),
                   None if scales is None else record_tensors(scales))


def put_reply_payload(content: RecordDict, payload: Payload) -> None:
    """Write ``payload`` as a train reply's state (and scales) records."""
    content[ex.ARRAYS] = to_record(payload.arrays)
    if payload.scales is not None:
        content[ex.SCALES] = to_record(payload.scales)
