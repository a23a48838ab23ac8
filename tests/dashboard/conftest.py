"""Fixtures of the dashboard tests: phantom sites and a real, finished ``simulate`` run.

The run is ``fed-unimiss simulate`` in a subprocess; its output is kept so that the tests can
look for the sites' log lines in what the dashboard serves. Helpers are in dash_helpers.py.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from dash_helpers import federation_config, simulate_command, simulate_env


@pytest.fixture(scope="session")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three phantom sites: A and B X-ray only, C both (CT and X-ray)."""
    from fed_unimiss.data.phantom import write_phantoms

    root = tmp_path_factory.mktemp("dashboard-sites")
    write_phantoms(root / "xa", 0, 6, seed=3)
    write_phantoms(root / "xb", 0, 4, seed=4)
    write_phantoms(root / "both", n_ct=1, n_xray=2, seed=5)
    return {"A": root / "xa", "B": root / "xb", "C": root / "both"}


@dataclass(frozen=True)
class FinishedRun:
    out: Path
    output: str  # everything the simulate command printed, its log lines included
    sites: dict[str, Path]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, sites: dict[str, Path]) -> FinishedRun:
    """3 rounds of 3 sites; A is a DP site whose budget (epsilon 8) refuses round 3."""
    tmp = tmp_path_factory.mktemp("dashboard-run")
    out = tmp / "run"
    proc = subprocess.run(simulate_command(federation_config(tmp), sites, 3, out, dp_site="A"),
                          capture_output=True, text=True, timeout=600, env=simulate_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return FinishedRun(out, proc.stdout + proc.stderr, sites)
