"""`fed-unimiss pretrain --dp-*`: a single-site DP run spends from a persisted ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fed_unimiss.cli.main import main
from fed_unimiss.data.phantom import write_phantoms
from fed_unimiss.privacy.ledger import LEDGER_FILE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dp_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-pretrain")
    recipe = yaml.safe_load((REPO / "configs/pretrain/micro.yaml").read_text())
    recipe.setdefault("model", {})["head_weight_norm"] = False
    recipe["ssl"].update(koleo_weight=0.0, checkpoint_every=2, steps_per_epoch=2, epochs=2,
                         batch_size_2d=4, threads=1)
    (root / "dp.yaml").write_text(yaml.safe_dump(recipe))
    write_phantoms(root / "ph", n_ct=0, n_xray=6, seed=2)
    return root


def _pretrain(root: Path, out: str, *extra: str) -> int:
    return main(["pretrain", "--config", str(root / "dp.yaml"), "--data", str(root / "ph"),
                 "--out", str(root / out), "--no-progress", *extra])


@pytest.mark.slow
def test_dp_pretrain_spends_within_budget_and_refuses_beyond_it(dp_setup, capsys):
    assert _pretrain(dp_setup, "run", "--dp-epsilon", "3", "--dp-clip", "1.0") == 0
    out = capsys.readouterr().out
    assert "epsilon spent so far" in out
    ledger = json.loads((dp_setup / "run" / "state" / LEDGER_FILE).read_text())
    epsilons = [r["epsilon"] for r in ledger["rounds"]]
    assert len(epsilons) == 2 and epsilons[0] < epsilons[1] <= 3.0
    assert (dp_setup / "run" / "ckpt_00000004.json").exists()
    # Training the same data again from the start (same state dir) is refused: the ledger
    # remembers what was spent, and no checkpoint is written or rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in (dp_setup / "run").glob("ckpt_*")}
    assert _pretrain(dp_setup, "run", "--dp-epsilon", "3") == 3
    assert "privacy budget exhausted" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in (dp_setup / "run").glob("ckpt_*")}
    assert after == before


def test_dp_flags_need_epsilon_and_a_dp_capable_recipe(dp_setup, capsys):
    assert _pretrain(dp_setup, "run-flags", "--dp-clip", "2") == 2
    assert "--dp-delta/--dp-clip need --dp-epsilon" in capsys.readouterr().err
    micro = str(REPO / "configs/pretrain/micro.yaml")
    assert main(["pretrain", "--config", micro, "--data", str(dp_setup / "ph"), "--out",
                 str(dp_setup / "run-wn"), "--no-progress", "--dp-epsilon", "2"]) == 2
    assert "model.head_weight_norm: DP training needs" in capsys.readouterr().err
