"""The Flower line this layer was written for, and the check that refuses any other."""

from __future__ import annotations

import flwr

__all__ = ["PINNED_FLOWER", "check_flower_version"]

# The private hooks in this package were read from and tested against 1.39.x; peers must also
# match major.minor (docs/flower.md, "Versions").
PINNED_FLOWER = "1.39."


def check_flower_version(version: str | None = None) -> None:
    """Refuse to run on a Flower whose internals this layer was not written for."""
    version = flwr.__version__ if version is None else version
    if not version.startswith(PINNED_FLOWER):
        raise RuntimeError(
            f"fed-unimiss was written for flwr {PINNED_FLOWER}x and uses its private "
            f"TaskIdentity and message-id hooks; found flwr {version}. Install flwr>=1.39,<1.40 "
            "or port flower_layer/"
        )
