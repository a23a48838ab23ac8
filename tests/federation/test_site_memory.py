"""A site whose worker restarts between rounds loses nothing: its exchange memory is on disk.

The warm worker keeps the site's end of the exchange in memory (the base of ``down: q8_delta``,
the residual of ``up: q8_delta``, the site's own teacher). A worker that restarts used to lose
them: its next round cost a full base and a cold residual, and a local teacher started again
from the student. Here every site's process memory is wiped before every round after the first
(what a restarted worker has), with the real ServerApp and ClientApps in process, and the run
must be the run without restarts, bit for bit, at the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from federation_helpers import micro_federation
from flwr.app import Message

from aggregator.inprocess import InProcessGrid
from aggregator.simulate_cli import simulate
from fed_unimiss import exchange as ex
from fed_unimiss.checkpoint import load_checkpoint
from site_client.client_app import in_process_sessions
from site_client.site_session import MEMORY_FILE

ROUNDS = 3


class RestartGrid(InProcessGrid):
    """Before each train instruction of round 2 on, the sites' process memory is gone."""

    wiped: set[str] = set()

    def deliver(self, msg: Message) -> Message | None:
        if msg.metadata.message_type == ex.TRAIN:
            round_num = str(msg.content.config_records[ex.CONFIG][ex.ROUND])
            if round_num != "1" and round_num not in self.wiped:
                in_process_sessions().sessions.clear()
                self.wiped.add(round_num)
        return super().deliver(msg)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_site_restarted_between_rounds_continues_its_exchange(phantom_sites, tmp_path):
    cfg = micro_federation(tmp_path / "fed.yaml", min_sites=3, evaluate=False,
                           exchange={"down": "q8_delta", "up": "q8_delta", "teacher": "local"})
    sites = list(phantom_sites.items())
    in_process_sessions().sessions.clear()
    simulate(cfg, sites, ROUNDS, tmp_path / "steady")
    in_process_sessions().sessions.clear()
    RestartGrid.wiped = set()
    simulate(cfg, sites, ROUNDS, tmp_path / "restarted", grid_cls=RestartGrid)
    assert RestartGrid.wiped == {"2", "3"}

    steady, restarted = _rows(tmp_path / "steady"), _rows(tmp_path / "restarted")
    for a, b in zip(steady, restarted, strict=True):
        assert b["sites"] == a["sites"] == ["both", "ct", "xr"] and b["rejected"] == {}
        assert b["bytes_down"] == a["bytes_down"]  # deltas, not the full base again
    for rnd in range(1, ROUNDS + 1):
        a, _ = load_checkpoint(tmp_path / "steady" / f"global_round_{rnd:04d}.safetensors")
        b, _ = load_checkpoint(tmp_path / "restarted" / f"global_round_{rnd:04d}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), rnd
    memory = tmp_path / "restarted" / "sites" / "ct" / MEMORY_FILE
    assert memory.stat().st_mode & 0o777 == 0o600
