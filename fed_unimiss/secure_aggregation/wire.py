"""How a secure round's plan and stage messages travel: config values and uint8 arrays.

The four stages of :mod:`.site` / :mod:`.server` exchange plain data: the round plan, dicts of
bytes (signed adverts, sealed shares, revealed shares) and a ring vector. A Flower message carries
config values (numbers, strings, bytes) and arrays, so:

- the plan travels in the train instruction's config (:func:`plan_to_config`), the scales as
  the raw bytes of their float32 array: every site quantises with exactly the aggregator's scales;
- a dict of bytes travels as uint8 arrays named ``<outer>/<inner>`` (:func:`to_arrays`), in the
  message's one array record, next to nothing else;
- a masked vector travels packed, ceil(k/8) bytes a coordinate (:func:`masked_to_arrays`).

Which stage a message is, and which round it belongs to, are config values
(:data:`STAGE`, :data:`ROUND_ID`): a site answers a stage only for the round whose party it holds.

Pure numpy, no flwr.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from fed_unimiss.secure_aggregation.plan import RoundPlan
from fed_unimiss.secure_aggregation.ring import RingPlan, pack, unpack

__all__ = ["STAGE", "ROUND_ID", "SURVIVORS", "MASKED", "SHARE_KEYS", "MASKED_INPUT", "UNMASK",
           "STAGES", "plan_to_config", "plan_from_config", "to_arrays", "from_arrays",
           "masked_to_arrays", "masked_from_arrays"]

STAGE = "secure_stage"  # config: which of the stages after the train instruction this is
ROUND_ID = "secure_round_id"  # config: the plan's round id (train instruction and every stage)
SURVIVORS = "secure_survivors"  # config of the unmask stage: JSON list of the survivors (U3)
MASKED = "masked"  # the one array of a masked-input reply
_PLAN = "secure_plan_json"  # config of the train instruction: the plan without its scales
_SCALES = "secure_scales"  # config of the train instruction: float32 scales, raw bytes

SHARE_KEYS, MASKED_INPUT, UNMASK = "share_keys", "masked_input", "unmask"
STAGES = (SHARE_KEYS, MASKED_INPUT, UNMASK)  # stage 1 (advertise) rides on the train reply


def plan_to_config(plan: RoundPlan) -> dict[str, str | bytes]:
    """The plan as config values of the train instruction (:func:`plan_from_config` inverts it)."""
    data = plan.to_dict()
    ring = dict(data["ring"])  # type: ignore[arg-type]
    scales = np.ascontiguousarray(ring.pop("scales"), dtype="<f4")
    data["ring"] = ring
    return {_PLAN: json.dumps(data, separators=(",", ":")), _SCALES: scales.tobytes(),
            ROUND_ID: plan.round_id}


def plan_from_config(config: Mapping[str, object]) -> RoundPlan | None:
    """The announced plan, or None when the instruction announces none; ``ValueError`` if it
    is malformed or could overflow (RingPlan's checks)."""
    text = config.get(_PLAN)
    if text is None:
        return None
    try:
        data = json.loads(str(text))
        raw = config[_SCALES]
        if not isinstance(raw, bytes | bytearray) or len(raw) % 4:
            raise ValueError("the scales are not float32 bytes")
        data["ring"]["scales"] = np.frombuffer(bytes(raw), dtype="<f4").copy()
        return RoundPlan.from_dict(data)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed secure round plan ({type(e).__name__}: {e})") from None


def to_arrays(nested: Mapping[str, Mapping[str, bytes]]) -> dict[str, np.ndarray]:
    """``{outer: {inner: bytes}}`` -> ``{"outer/inner": uint8 array}``."""
    out = {}
    for outer, inner in nested.items():
        for key, value in inner.items():
            if "/" in outer or "/" in key:
                raise ValueError(f"name {outer!r}/{key!r} contains '/'")
            out[f"{outer}/{key}"] = np.frombuffer(bytes(value), dtype=np.uint8).copy()
    return out


def from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, bytes]]:
    """The inverse of :func:`to_arrays`; ``ValueError`` for a name or array that does not fit."""
    out: dict[str, dict[str, bytes]] = {}
    for name, arr in arrays.items():
        outer, sep, key = name.partition("/")
        if not sep or not outer or not key or "/" in key:
            raise ValueError(f"array {name!r} is not named <outer>/<inner>")
        arr = np.asarray(arr)
        if arr.dtype != np.uint8 or arr.ndim != 1:
            raise ValueError(f"array {name!r} is not a flat uint8 array")
        out.setdefault(outer, {})[key] = arr.tobytes()
    return out


def masked_to_arrays(masked: np.ndarray, ring: RingPlan) -> dict[str, np.ndarray]:
    """A masked vector as the one uint8 array of its reply (packed, :func:`~.ring.pack`)."""
    return {MASKED: np.frombuffer(pack(masked, ring), dtype=np.uint8).copy()}


def masked_from_arrays(arrays: Mapping[str, np.ndarray], ring: RingPlan) -> np.ndarray:
    """The masked vector of a reply; ``ValueError`` if it is missing or has the wrong size."""
    if set(arrays) != {MASKED}:
        raise ValueError(f"a masked-input reply holds one array {MASKED!r}")
    arr = np.asarray(arrays[MASKED])
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError("the masked vector is not a flat uint8 array")
    return unpack(arr.tobytes(), ring)
