"""``probe:`` in site.yaml: a labelled folder on which this site probes the global model.

A site may hold a small labelled probe set (a folder `fed-unimiss probe` and `finetune` read).
When the federation asks (``probe_every``), the site probes the global teacher and student it
receives and returns balanced accuracies only (:mod:`site_client.probe_round`). The folder
never leaves the site; its path goes only into the SuperNode's node config on this machine.
Light on purpose: ``site start`` imports it (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fed_unimiss.exchange import probe_node_config

__all__ = ["SiteProbe", "probe_folder", "site_probe_node_config"]


@dataclass(frozen=True)
class SiteProbe:
    """A labelled probe set of this site."""

    # The labelled folder (layouts: docs/researcher-guide.md); relative paths: to the kit.
    data: str = ""
    # seg3d / seg2d: per voxel (pixel); cls3d / cls2d: per image (labels.csv).
    task: Literal["seg3d", "seg2d", "cls3d", "cls2d"] = "seg3d"
    # A ProbeConfig YAML (configs/probe/*.yaml); null: the recipe's input sizes and spacing.
    config: str | None = None

    def validate(self) -> None:
        if not self.data:
            raise ValueError("data: the labelled probe folder is missing (probe: {data: DIR})")


def _path(value: str, root: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def probe_folder(probe: SiteProbe, root: Path) -> Path:
    """The probe folder, relative paths taken from the kit folder ``root``."""
    return _path(probe.data, root)


def site_probe_node_config(probe: SiteProbe | None, root: Path) -> dict[str, str]:
    """The probe-* node config keys of this site ({} without a probe set)."""
    if probe is None:
        return {}
    config = _path(probe.config, root) if probe.config else None
    return probe_node_config(probe_folder(probe, root), probe.task, config)
