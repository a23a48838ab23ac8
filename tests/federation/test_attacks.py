"""Robust aggregation end to end: one attacking site of each kind against the default configuration.

3 honest phantom sites (CT only, X-ray only, both) + 1 attacker (CT + X-rays), 3 rounds of the
micro recipe with 2 local steps, the real ServerApp and ClientApps in process
(``simulate --attack``). The global student must stay within ``BOUND`` of the honest-only run
(the 3 honest sites alone), in relative L2: ||s_attack - s_honest|| / ||s_honest - s_init||,
i.e. the attacker moves the model less than honest training itself moved it. Every kind is
rejected every round under the default configuration, which leaves the model exactly where the
honest run puts it; BOUND is what the issue's guarantee states for a kind that got through.

A sign-flipped update has an honest norm and is caught by its direction alone: its teacher
update against the median of the other replies' (docs/federation.md, "Robustness").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from aggregator.attacks import ATTACKS
from aggregator.simulate_cli import simulate
from fed_unimiss.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 3
BOUND = 0.75  # relative L2 distance to the honest run (measured: 0 for every kind)

pytestmark = pytest.mark.slow


def _config(tmp: Path) -> Path:
    body = {"recipe": str(REPO / "configs" / "pretrain" / "micro.yaml"),
            "recipe_overrides": {"ssl": {"steps_per_epoch": 1, "batch_size_2d": 2,
                                         "batch_size_3d": 1, "threads": 1}},
            "local_steps": 2, "min_sites": 2, "round_timeout": 600, "evaluate": False,
            "poll_interval": 0.05}  # every robustness setting at its default
    path = tmp / "federation.yaml"
    path.write_text(json.dumps(body))
    return path


@pytest.fixture(scope="module")
def setup(phantom_sites, tmp_path_factory):
    from fed_unimiss.data.phantom import write_phantoms

    root = tmp_path_factory.mktemp("attacks")
    attacker = root / "attacker"
    write_phantoms(attacker, n_ct=1, n_xray=3, seed=4)
    cfg = _config(root)
    simulate(cfg, list(phantom_sites.items()), ROUNDS, root / "honest")
    honest, _ = load_checkpoint(root / "honest" / f"global_round_{ROUNDS:04d}")
    from aggregator.rounds import FederationRun, initial_state

    run = FederationRun.from_files(cfg, root / "unused", ROUNDS)
    init = initial_state(run.recipe, ROUNDS * run.cfg.local_steps)
    return root, cfg, {**phantom_sites, "M": attacker}, honest, init


def _distance(a, b, init) -> float:
    keys = [k for k in b if k.startswith("student.")]
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    den = sum(float((b[k].double() - init[k].double()).pow(2).sum()) for k in keys)
    return math.sqrt(num / den)


@pytest.mark.parametrize("kind", ATTACKS)
def test_one_attacker_cannot_move_the_model_beyond_the_bound(setup, kind):
    root, cfg, sites, honest, init = setup
    out = root / kind
    simulate(cfg, list(sites.items()), ROUNDS, out, attacks={"M": kind})
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    state, _ = load_checkpoint(out / f"global_round_{ROUNDS:04d}")
    distance = _distance(state, honest, init)
    assert distance <= BOUND, f"{kind}: distance {distance:.3f} > {BOUND}"
    flagged = [r["round"] for r in rows if r["decisions"]["M"]["action"] in ("clipped", "rejected")]
    for r in rows:  # the honest sites are never touched
        assert r["sites"] == ["both", "ct", "xr"] or r["round"] not in flagged
        assert all(r["decisions"][s]["action"] == "accepted" for s in ("both", "ct", "xr"))
        if r["round"] in flagged:
            assert r["rejected"]["M"] == r["decisions"]["M"]["reason"]
    assert flagged == [1, 2, 3], [r["decisions"]["M"] for r in rows]
    assert distance < 1e-6  # rejected every round: exactly the honest run
    if kind == "signflip":
        assert all("teacher update points against the other replies' median update"
                   in r["rejected"]["M"] for r in rows)
