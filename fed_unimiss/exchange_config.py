"""The federation's ``exchange:`` section: which codec each direction uses.

Light (no torch): the federation config and the site's ClientApp shim import it. The codecs
themselves are in :mod:`fed_unimiss.exchange_codec`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fed_unimiss.exchange import EXCHANGE_DOWN, EXCHANGE_TEACHER, EXCHANGE_UP, TEACHER_PREFIX

__all__ = ["ExchangeConfig", "SecureConfig", "CodecError", "CONFIG_KEYS", "DOWN_CODECS",
           "UP_CODECS", "UP_MODES", "SECURE", "TEACHER_MODES", "describe", "sent_keys"]

DOWN_CODECS = ("fp32", "bf16", "fp16", "q8_delta")
UP_CODECS = ("fp32", "bf16", "fp16", "q8_delta")  # each site's update travels readable
# ``secure``: each site's update travels masked; the aggregator recovers only the weighted sum
# (fed_unimiss/secure_aggregation, docs/privacy.md "Secure aggregation").
SECURE = "secure"
UP_MODES = (*UP_CODECS, SECURE)
TEACHER_MODES = ("exchanged", "local")

# Instruction config keys: what every site must honour this round.
CONFIG_KEYS = (EXCHANGE_DOWN, EXCHANGE_UP, EXCHANGE_TEACHER)



class CodecError(ValueError):
    """An encoded state that does not decode; ``str(e)`` names the tensor and the problem."""


@dataclass(frozen=True)
class SecureConfig:
    """``exchange.secure``: the ring every site quantises into under ``up: secure``.

    The aggregator turns it into each round's announced ring plan
    (:class:`~fed_unimiss.secure_aggregation.ring.RingPlan`): one scale per block from the clip,
    the same for every site, and integer weights fitted to the count bounds.
    """

    # k: the ring is the integers mod 2^k. 16 = 2 bytes a coordinate, 0.5x the fp32 bytes.
    # More bits leave room for more levels, sites or finer weights (the overflow bound
    # sites x max weight x levels < 2^(k-1) is checked when the round is planned).
    bits: int = 16
    # L: a coordinate of an update is rounded to one of 2L+1 steps of clip / L. More levels,
    # less rounding noise (error feedback carries it to the next round anyway), coarser weights.
    levels: int = 31
    # The L-infinity clip of every coordinate of every update. null: derived per round and per
    # tensor from the recipe (the student's Adam step bound, the teacher's EMA pull of it, the
    # center's momentum), the same bounds the plain exchange screens norms with. A number: one
    # bound for every coordinate. What the clip cuts is carried to the site's next update.
    clip: float | None = None
    # t: survivors whose shares rebuild a dropped site's masks. null: a strict majority of the
    # sites that hold a site's shares (the smallest the protocol accepts): the roster, or a site
    # and its neighbours.
    threshold: int | None = None
    # Coordinates per announced scale.
    block: int = 256
    # k: each site masks with its k nearest sites on a random circle instead of every other
    # site (SecAgg+): a site's masking costs k masks, not one per site. Even, >= 2; null (or
    # k >= sites - 1): every other site. The aggregator learns a site's update if it colludes
    # with t of that site's k neighbours (docs/privacy.md).
    neighbours: int | None = None

    def validate(self) -> None:
        if not 8 <= self.bits <= 62:
            raise ValueError(f"bits: must be in [8, 62], got {self.bits}")
        if self.levels < 1:
            raise ValueError(f"levels: must be >= 1, got {self.levels}")
        if self.clip is not None and not (self.clip > 0 and self.clip < float("inf")):
            raise ValueError(f"clip: must be a positive number or null, got {self.clip}")
        if self.threshold is not None and self.threshold < 2:
            raise ValueError(f"threshold: must be >= 2 or null, got {self.threshold}")
        if self.block < 1:
            raise ValueError(f"block: must be >= 1, got {self.block}")
        if self.neighbours is not None and (self.neighbours < 2 or self.neighbours % 2):
            raise ValueError(f"neighbours: must be an even number >= 2 or null, got "
                             f"{self.neighbours}")


@dataclass(frozen=True)
class ExchangeConfig:
    """The federation YAML's ``exchange:`` section (docs/federation.md, "Exchange")."""

    # fp32 | bf16 | fp16 (full tensors) | q8_delta (int8 change of a base every site holds).
    down: str = "fp32"
    # fp32 | bf16 | fp16 (full tensors) | q8_delta (int8 update with error feedback) |
    # secure (masked in a finite ring: the aggregator sums updates it cannot read).
    up: str = "fp32"
    # exchanged (the paper's method) | local (each site keeps its teacher; a method change).
    teacher: str = "exchanged"
    # The ring of ``up: secure`` (null: its defaults); only with ``up: secure``.
    secure: SecureConfig | None = None

    def validate(self) -> None:
        for field_name, value, allowed in (("down", self.down, DOWN_CODECS),
                                           ("up", self.up, UP_MODES),
                                           ("teacher", self.teacher, TEACHER_MODES)):
            if value not in allowed:
                raise ValueError(f"{field_name}: {value!r} is not one of {', '.join(allowed)}")
        if self.secure is not None and self.up != SECURE:
            raise ValueError(f"secure: set only with up: secure (up is {self.up}); remove the "
                             "section or switch up to secure")
        if self.secure is not None:
            try:
                self.secure.validate()
            except ValueError as e:
                raise ValueError(f"secure.{e}") from None

    @property
    def masked(self) -> bool:
        """True when updates travel masked (``up: secure``): the aggregator sees only sums."""
        return self.up == SECURE

    @property
    def ring(self) -> SecureConfig:
        """The secure ring's settings (the defaults when the section is absent)."""
        return self.secure if self.secure is not None else SecureConfig()

    def to_config(self) -> dict[str, str]:
        return {EXCHANGE_DOWN: self.down, EXCHANGE_UP: self.up, EXCHANGE_TEACHER: self.teacher}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> ExchangeConfig:
        """The announced exchange (absent keys: fp32, as before the exchange existed).

        Raises ``CodecError`` naming the key for a value this code cannot honour.
        """
        values = {}
        for key, attr, allowed, default in ((EXCHANGE_DOWN, "down", DOWN_CODECS, "fp32"),
                                            (EXCHANGE_UP, "up", UP_MODES, "fp32"),
                                            (EXCHANGE_TEACHER, "teacher", TEACHER_MODES,
                                             "exchanged")):
            value = config.get(key, default)
            if value not in allowed:
                raise CodecError(f"{key} {value!r} is not supported here (supported: "
                                 f"{', '.join(allowed)})")
            values[attr] = str(value)
        return cls(**values)


def describe(cfg: ExchangeConfig) -> str:
    """One short label for logs and rounds.jsonl, e.g. ``down=bf16 up=q8_delta teacher=local``."""
    return f"down={cfg.down} up={cfg.up} teacher={cfg.teacher}"


def sent_keys(names: Iterable[str], cfg: ExchangeConfig) -> list[str]:
    """The tensors that travel: all, or all but ``teacher.*`` with a site-local teacher."""
    if cfg.teacher == "local":
        return [n for n in names if not n.startswith(TEACHER_PREFIX)]
    return list(names)


