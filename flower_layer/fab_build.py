"""Build a Flower App Bundle in memory with the ``flwr`` CLI's own builder.

Flower 1.39 has no public API for this; ``flwr.cli.build.build_fab_from_files`` is what ``flwr
build`` uses, and it applies Flower's checks of the pyproject (docs/flower.md, "Starting a run
from Python").
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.cli.build import build_fab_from_files

__all__ = ["build_fab_bytes"]


def build_fab_bytes(files: Mapping[str, bytes]) -> bytes:
    """The FAB zip of ``files`` (name -> content), as ``flwr build`` would write it.

    Raises:
        ValueError: Flower rejected the configuration (the message says which key).
    """
    fab, _meta = build_fab_from_files(dict(files))
    return fab
