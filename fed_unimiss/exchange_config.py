"""The federation's ``exchange:`` section: which codec each direction uses.

Light (no torch): the federation config and the site's ClientApp shim import it. The codecs
themselves are in :mod:`fed_unimiss.exchange_codec`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fed_unimiss.exchange import EXCHANGE_DOWN, EXCHANGE_TEACHER, EXCHANGE_UP, TEACHER_PREFIX

__all__ = ["ExchangeConfig", "CodecError", "CONFIG_KEYS", "DOWN_CODECS", "UP_CODECS",
           "TEACHER_MODES", "describe", "sent_keys"]

DOWN_CODECS = ("fp32", "bf16", "fp16", "q8_delta")
UP_CODECS = ("fp32", "bf16", "fp16", "q8_delta")
TEACHER_MODES = ("exchanged", "local")

# Instruction config keys: what every site must honour this round.
CONFIG_KEYS = (EXCHANGE_DOWN, EXCHANGE_UP, EXCHANGE_TEACHER)



class CodecError(ValueError):
    """An encoded state that does not decode; ``str(e)`` names the tensor and the problem."""


@dataclass(frozen=True)
class ExchangeConfig:
    """The federation YAML's ``exchange:`` section (docs/federation.md, "Exchange")."""

    # fp32 | bf16 | fp16 (full tensors) | q8_delta (int8 change of a base every site holds).
    down: str = "fp32"
    # fp32 | bf16 | fp16 (full tensors) | q8_delta (int8 update with error feedback).
    up: str = "fp32"
    # exchanged (the paper's method) | local (each site keeps its teacher; a method change).
    teacher: str = "exchanged"

    def validate(self) -> None:
        for field_name, value, allowed in (("down", self.down, DOWN_CODECS),
                                           ("up", self.up, UP_CODECS),
                                           ("teacher", self.teacher, TEACHER_MODES)):
            if value not in allowed:
                raise ValueError(f"{field_name}: {value!r} is not one of {', '.join(allowed)}")

    def to_config(self) -> dict[str, str]:
        return {EXCHANGE_DOWN: self.down, EXCHANGE_UP: self.up, EXCHANGE_TEACHER: self.teacher}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> ExchangeConfig:
        """The announced exchange (absent keys: fp32, as before the exchange existed).

        Raises ``CodecError`` naming the key for a value this code cannot honour.
        """
        values = {}
        for key, attr, allowed, default in ((EXCHANGE_DOWN, "down", DOWN_CODECS, "fp32"),
                                            (EXCHANGE_UP, "up", UP_CODECS, "fp32"),
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


