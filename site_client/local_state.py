"""A site's own state directory: what must outlive one Flower message.

In deployment every message runs in a fresh ClientApp process, so nothing may live in globals.
Under ``state-dir`` (from the SuperNode's node config) a site keeps::

    cache/            the preprocessed data cache and its index (fed_unimiss.data.build_cache)
    site_state.json   when the cache was last scanned, and the schedule position of the last
                      round trained (round, global steps) - site-local, never sent
    progress.jsonl    one line per message handled (trained, refused, failed): what
                      ``site start`` prints on the site's terminal - site-local, never sent

The folder is scanned once per run (and again when the data settings of the recipe change);
later messages of the same run reuse the index without touching the image files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_unimiss import exchange as ex
from fed_unimiss.checkpoint import append_jsonl, atomic_write_json

__all__ = ["SiteSetupError", "SiteState", "PROGRESS_FILE"]

log = logging.getLogger(__name__)

STATE_FILE = "site_state.json"
PROGRESS_FILE = "progress.jsonl"  # read by site_client.supernode (the site's terminal)


class SiteSetupError(ValueError):
    """The site's node config or data folder is unusable; the message is for the site's log."""


@dataclass(frozen=True)
class SiteState:
    """Paths and the optional label from the SuperNode's node config."""

    data_path: Path
    state_dir: Path
    site_name: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteState:
        """Read ``data-path``, ``state-dir`` and optional ``site-name``; errors name the key."""
        values = {}
        for key in (ex.NODE_DATA_PATH, ex.NODE_STATE_DIR):
            value = node_config.get(key)
            if not isinstance(value, str) or not value:
                raise SiteSetupError(
                    f"node config {key!r} missing or not a string; start the SuperNode with "
                    f"--node-config '{ex.NODE_DATA_PATH}=\"/data\" {ex.NODE_STATE_DIR}=\"/state\"'"
                )
            values[key] = Path(value)
        data_path = values[ex.NODE_DATA_PATH]
        if not data_path.is_dir():
            raise SiteSetupError(f"node config {ex.NODE_DATA_PATH!r}: {data_path} is not a folder")
        name = node_config.get(ex.NODE_SITE_NAME)
        if name is not None and not ex.is_valid_site_name(name):
            log.warning("node config %r is not a plain label (letters, digits, '_.-', at most "
                        "%d characters); it will not be sent", ex.NODE_SITE_NAME,
                        ex.MAX_SITE_NAME_LEN)
            name = None
        return cls(data_path, values[ex.NODE_STATE_DIR], name)

    # ------------------------------------------------------------------ persisted facts
    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads((self.state_dir / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.state_dir / STATE_FILE, data)

    def record_event(self, round_num: int, event: str, **fields: Any) -> None:
        """Append what this message did to ``progress.jsonl`` for the site's own terminal.

        Site-local only: the text may name local settings; it never goes into a reply.
        """
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.state_dir / PROGRESS_FILE,
                         {"round": round_num, "event": event, **fields})
        except OSError:
            log.warning("cannot write %s", self.state_dir / PROGRESS_FILE, exc_info=True)

    def position(self) -> dict[str, Any]:
        """The schedule position after the last round this site trained, or {}."""
        return dict(self._read().get("position", {}))

    def record_position(self, round_num: int, start_step: int, steps: int, total: int) -> None:
        data = self._read()
        data["position"] = {"round": round_num, "start_step": start_step,
                            "end_step": start_step + steps, "total_steps": total}
        self._write(data)

    # ------------------------------------------------------------------ data
    def site_index(self, data_cfg: Any, run_id: int) -> Any:
        """The site's data index: scanned once per (run, data settings), then reused."""
        from fed_unimiss.data.cache import SiteIndex, build_cache

        key = f"{run_id}:{data_cfg.ct_settings_hash()}:{data_cfg.xray_settings_hash()}"
        data = self._read()
        if data.get("scanned") == key:
            try:
                return SiteIndex.load(self.state_dir)
            except ValueError as e:  # an index removed or damaged since: rebuild it
                log.warning("site index unusable (%s); rescanning", e)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        index = build_cache([self.data_path], self.state_dir, data_cfg)
        data = self._read()
        data["scanned"] = key
        self._write(data)
        return index

    def site_data(self, data_cfg: Any, run_id: int) -> Any:
        """The trainer's view of the site's data (``fed_unimiss.ssl.SiteData``)."""
        from fed_unimiss.ssl.site_data import SiteData

        index = self.site_index(data_cfg, run_id)
        data = SiteData.from_index(index)
        if len(data) == 0:
            raise SiteSetupError(
                f"{self.data_path}: no usable CT or X-ray images ({index.summary()['rejected']} "
                "rejected); run `fed-unimiss data check` on it"
            )
        return data
