"""DP training over rounds on phantoms, and the budget in a simulated federation."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fed_unimiss.data.cache import build_cache
from fed_unimiss.privacy import PrivacyConfig, PrivacyLedger
from fed_unimiss.ssl.config import load_recipe
from fed_unimiss.ssl.dp_step import DPStep, site_sample_rate
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.site_data import SiteData

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


@pytest.mark.slow
def test_three_dp_rounds_epsilon_grows_matches_opacus_and_loss_falls(xray_site, tmp_path):
    recipe = load_recipe(REPO / "configs/pretrain/micro.yaml")
    recipe = dataclasses.replace(
        recipe,
        model=dataclasses.replace(recipe.model, head_weight_norm=False),
        ssl=dataclasses.replace(recipe.ssl, steps_per_epoch=2, freeze_last_layer=0, koleo_weight=0.0,
                                warmup_epochs=0, lr=0.05),
    )
    data = SiteData.from_index(build_cache([xray_site], tmp_path / "state"))
    privacy = PrivacyConfig(enabled=True, target_epsilon=30.0, planned_rounds=3,
                            patients_per_step=4, max_grad_norm=1.0)
    q = site_sample_rate(privacy, data)
    state, epsilons, round_losses, acc = None, [], [], RDPAccountant()
    for rnd in range(3):
        ledger = PrivacyLedger.open(tmp_path / "state", privacy)  # fresh, as a new process
        plan = ledger.plan(rnd + 1, STEPS, q)
        assert plan.allowed, plan.message
        engine = SelfDistillation(recipe, 3 * STEPS, gradient_step=DPStep(
            privacy, plan.noise_multiplier, dp_seed=rnd))
        if state is not None:
            engine.load_exchange_state(state)
        stats = engine.train_steps(data, rnd * STEPS, STEPS)
        assert stats.steps == STEPS
        state = engine.exchange_state()
        epsilons.append(ledger.commit(plan))
        for _ in range(STEPS):  # independent computation, one accountant step per DP step
            acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=q)
        assert epsilons[-1] == pytest.approx(acc.get_epsilon(delta=privacy.target_delta),
                                             rel=1e-9)
        round_losses.append([h["loss"] for h in stats.history if h["batch"]])
    assert epsilons[0] < epsilons[1] < epsilons[2] <= privacy.target_epsilon
    first, last = round_losses[0], round_losses[-1]
    assert sum(last) / len(last) < sum(first) / len(first)


@pytest.mark.slow
def test_federation_refuses_round_three_at_the_dp_site_and_continues(xray_site, xray_site_b,
                                                                    tmp_path):
    from aggregator.simulate_cli import simulate

    out = tmp_path / "run"
    # micro.yaml keeps weight norm; the DP recipe lives in micro-dp.yaml (site_privacy for all);
    # B is made non-DP by a copy of it without site_privacy.
    cfg = (REPO / "configs/federation/micro-dp.yaml").read_text()
    cfg = cfg.replace("recipe: ../pretrain/micro.yaml",
                      f"recipe: {REPO / 'configs/pretrain/micro.yaml'}")
    cfg = cfg.split("site_privacy:")[0]
    config = tmp_path / "fed.yaml"
    config.write_text(cfg)
    simulate(config, [("A", xray_site), ("B", xray_site_b)], 3, out,
             dp_flags={"dp-epsilon": ["A=8"], "dp-planned-rounds": ["A=2"],
                       "dp-patients-per-step": ["A=2"]})
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["sites"] == ["A", "B"] and rows[1]["sites"] == ["A", "B"]
    assert rows[2]["sites"] == ["B"]
    assert "privacy budget exhausted" in rows[2]["rejected"]["A"]
    eps = [r["epsilon"]["A"] for r in rows]
    assert 0 < eps[0] < eps[1] <= 8.0 and eps[2] == pytest.approx(eps[1])
    assert "B" not in rows[0]["epsilon"]
    # The site restarted (a new interpreter reading its state dir) still refuses round 3.
    code = (
        "import sys; from fed_unimiss.privacy import PrivacyConfig, PrivacyLedger;"
        "c = PrivacyConfig(enabled=True, target_epsilon=8.0, planned_rounds=2,"
        " patients_per_step=2);"
        f"l = PrivacyLedger.open({str(out / 'sites' / 'A')!r}, c);"
        "p = l.plan(3, 3, l.rounds[-1]['sample_rate']);"
        "sys.exit(0 if not p.allowed and len(l.refusals) == 1 else 1)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.slow
def test_micro_dp_federation_stops_when_every_site_refuses(xray_site, tmp_path):
    from aggregator.rounds import RoundFailed
    from aggregator.simulate_cli import simulate

    out = tmp_path / "run"
    with pytest.raises(RoundFailed, match="Every replying site refused: privacy budget exhausted"):
        simulate(REPO / "configs/federation/micro-dp.yaml", [("A", xray_site)], 3, out)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["epsilon"]["A"] < rows[1]["epsilon"]["A"] <= 8.0
