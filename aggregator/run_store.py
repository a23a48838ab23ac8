"""The RUN directory: one atomic checkpoint per round, ``rounds.jsonl``, and resume.

Layout::

    RUN/global_round_0001.safetensors   global state after round 1 (student, teacher, center)
    RUN/global_round_0001.json          sidecar: round, sites, counts, metrics, the run's config
    RUN/rounds.jsonl                    one JSON object per completed round
    RUN/replays.safetensors             what the replay checks remember (digests, samples)

A round is complete when its sidecar exists (``fed_unimiss.checkpoint`` writes it last, atomically).
The rounds.jsonl line is appended after the checkpoint; a crash between the two is repaired on
resume from the sidecar, which holds the same row. A run resumes only with the same run identity
(federation config, resolved recipe, number of rounds), because each of them changes the
schedules and hence the state a resumed run would reach.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from aggregator.run_summary import CHECKPOINT_PREFIX, ROUNDS_LOG
from fed_unimiss.checkpoint import (
    CheckpointError,
    append_jsonl,
    atomic_save_tensors,
    atomic_write_bytes,
    latest_checkpoint,
    load_checkpoint,
    read_tensors_if,
    save_checkpoint,
)

__all__ = ["RunStore", "ResumeError", "CHECKPOINT_PREFIX", "ROUNDS_LOG"]

log = logging.getLogger(__name__)

REPLAYS = "replays.safetensors"


class ResumeError(RuntimeError):
    """RUN cannot be started or resumed as asked; the message says why and what to do."""


def _differences(saved: dict[str, Any], current: dict[str, Any], where: str = "") -> list[str]:
    diffs: list[str] = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        path = f"{where}.{key}" if where else key
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_differences(a, b, path))
        elif a != b:
            diffs.append(f"{path}: saved {a!r}, now {b!r}")
    return diffs


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    @property
    def rounds_log(self) -> Path:
        return self.out / ROUNDS_LOG

    def checkpoint_name(self, round_num: int) -> str:
        return f"{CHECKPOINT_PREFIX}{round_num:04d}"

    def save_round(
        self,
        round_num: int,
        state: dict[str, torch.Tensor],
        row: dict[str, Any],
        identity: dict[str, Any],
    ) -> Path:
        """Checkpoint the global state after ``round_num`` (atomic), then log its row."""
        meta = {"round": round_num, "round_log": row, "run": identity}
        path = save_checkpoint(self.out, self.checkpoint_name(round_num), state, meta)
        append_jsonl(self.rounds_log, row)
        return path

    def save_replays(self, round_num: int, tensors: dict[str, torch.Tensor],
                     strings: dict[str, str]) -> None:
        """The replay checks' memory after ``round_num``, written after its checkpoint."""
        atomic_save_tensors(self.out / REPLAYS, tensors, {**strings, "round": str(round_num)})

    def load_replays(self, done: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The replay memory to resume after round ``done`` with, or None (none written, or
        written for a round this resume repeats: its replies will come again)."""
        try:
            return read_tensors_if(self.out / REPLAYS, lambda meta: "seen" in meta
                                   and int(meta.get("round", -1)) <= done)
        except CheckpointError as e:
            log.warning("%s: the replay checks start empty", e)
            return None

    def latest(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The last complete round: (round, state, sidecar), or None for a fresh directory."""
        path = latest_checkpoint(self.out, CHECKPOINT_PREFIX) if self.out.exists() else None
        if path is None:
            return None
        state, meta = load_checkpoint(path)
        return int(meta["round"]), state, meta

    def check_resumable(self, identity: dict[str, Any]) -> int:
        """Raise :class:`ResumeError` if RUN's last round was made with another identity.

        Reads the last sidecar only (no tensors), so ``aggregator start`` can refuse a resume
        with a different config or ``--rounds`` before it starts anything. Returns the last
        complete round (0 for a fresh RUN).
        """
        path = latest_checkpoint(self.out, CHECKPOINT_PREFIX) if self.out.exists() else None
        if path is None:
            return 0
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ResumeError(f"{path.with_suffix('.json')}: unreadable checkpoint sidecar "
                              f"({e})") from e
        self._check_identity(meta.get("run", {}), identity)
        return int(meta.get("round", 0))

    def _check_identity(self, saved: dict[str, Any], identity: dict[str, Any]) -> None:
        diffs = _differences(saved, identity)
        if diffs:
            shown = "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")
            raise ResumeError(
                f"{self.out}: cannot resume with a different configuration ({shown}); "
                "use the original config and --rounds, or start a new --out"
            )

    def start(
        self, identity: dict[str, Any], resume: bool
    ) -> tuple[int, dict[str, torch.Tensor] | None]:
        """Prepare RUN; returns (last complete round, its state) - (0, None) for a new run.

        Refuses to overwrite a run that has rounds unless ``resume``, and to resume a run whose
        identity (config, recipe, rounds) differs from the current one.
        """
        found = self.latest()
        if found is None:
            self.out.mkdir(parents=True, exist_ok=True)
            return 0, None
        last, state, meta = found
        if not resume:
            raise ResumeError(
                f"{self.out} already holds {last} complete round(s); pass --resume to continue "
                "that run, or choose a new --out"
            )
        self._check_identity(meta.get("run", {}), identity)
        self._repair_rounds_log(last, meta["round_log"])
        log.info("resuming %s after round %d", self.out, last)
        return last, state

    def _repair_rounds_log(self, last: int, last_row: dict[str, Any]) -> None:
        """Make rounds.jsonl hold exactly rounds 1..last (a crash may have cut it short)."""
        rows: list[dict[str, Any]] = []
        if self.rounds_log.exists():
            for line in self.rounds_log.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash mid-write
                if isinstance(row, dict) and isinstance(row.get("round"), int):
                    if row["round"] <= last:
                        rows.append(row)
        if not rows or rows[-1]["round"] != last:
            rows.append(last_row)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.rounds_log, text.encode())

    def read_rounds(self) -> list[dict[str, Any]]:
        """All rows of rounds.jsonl, in order."""
        if not self.rounds_log.exists():
            return []
        return [json.loads(line) for line in self.rounds_log.read_text().splitlines() if line]
