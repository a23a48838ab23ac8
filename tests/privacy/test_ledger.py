"""Budget ledger, accounting, patient sampling and the site's DP settings (no model, fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fed_unimiss.config import ConfigError
from fed_unimiss.privacy import (
    LEDGER_FILE,
    LedgerError,
    PatientPoissonSampler,
    PrivacyConfig,
    PrivacyLedger,
    clear_accounting_cache,
    noised_mean,
    privacy_refusal,
    sample_rate_for,
)
from site_client.privacy_ledger import site_privacy

CFG = PrivacyConfig(enabled=True, target_epsilon=4.0, target_delta=1e-5, planned_rounds=2)


def _opacus_epsilon(rounds: list[tuple[float, float, int]], delta: float) -> float:
    """Independent computation: Opacus's accountant stepped once per DP step."""
    acc = RDPAccountant()
    for sigma, q, steps in rounds:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_budget_allows_planned_rounds_then_refuses_across_restarts(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, CFG)
    eps = [0.0]
    for rnd in (1, 2):
        plan = PrivacyLedger.open(tmp_path, CFG).plan(rnd, 5, 0.25)
        assert plan.allowed, plan.message
        ledger = PrivacyLedger.open(tmp_path, CFG)  # a fresh process per round
        plan = ledger.plan(rnd, 5, 0.25)
        eps.append(ledger.commit(plan))
    assert eps[0] < eps[1] < eps[2] <= CFG.target_epsilon
    sigma = json.loads((tmp_path / LEDGER_FILE).read_text())["noise_multiplier"]
    assert eps[2] == pytest.approx(_opacus_epsilon([(sigma, 0.25, 5)] * 2, 1e-5), rel=1e-9)
    refused = PrivacyLedger.open(tmp_path, CFG).plan(3, 5, 0.25)
    assert not refused.allowed
    assert "refused: privacy budget exhausted" in refused.message
    assert refused.epsilon_before == pytest.approx(eps[2])
    PrivacyLedger.open(tmp_path, CFG).record_refusal(refused)
    # A restarted site: nothing memoised, only the file on disk; it still refuses (a separate
    # interpreter does the same in test_dp_rounds.py's federation test).
    clear_accounting_cache()
    again = PrivacyLedger.open(tmp_path, CFG)
    assert again.noise_multiplier == sigma and len(again.refusals) == 1
    assert not again.plan(3, 5, 0.25).allowed
    with pytest.raises(ValueError, match="cannot commit a refused round"):
        PrivacyLedger.open(tmp_path, CFG).commit(refused)


def test_unreadable_or_invalid_ledger_fails_closed(tmp_path):
    path = tmp_path / LEDGER_FILE
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger.open(tmp_path, CFG)
    path.write_text(json.dumps({"format": 1, "history": [[1.0, 2.0, 3]]}))
    with pytest.raises(LedgerError, match=r"history\[0\].*out of range"):
        PrivacyLedger.open(tmp_path, CFG)
    path.write_text(json.dumps({"format": 99, "history": []}))
    with pytest.raises(LedgerError, match="format 1"):
        PrivacyLedger.open(tmp_path, CFG)


def test_noised_center_is_accounted_as_a_joint_mechanism(tmp_path):
    cfg = PrivacyConfig(enabled=True, target_epsilon=4.0, planned_rounds=2, center="gaussian")
    ledger = PrivacyLedger.open(tmp_path, cfg)
    plan = ledger.plan(1, 5, 0.25)
    eps = ledger.commit(plan)
    # Two releases per step with noise sigma each = one Gaussian with multiplier sigma/sqrt(2).
    expected = _opacus_epsilon([(plan.noise_multiplier / math.sqrt(2), 0.25, 5)], 1e-5)
    assert eps == pytest.approx(expected, rel=1e-9)
    plain = PrivacyLedger.open(tmp_path / "plain", CFG).plan(1, 5, 0.25)
    assert plan.noise_multiplier == pytest.approx(plain.noise_multiplier * math.sqrt(2))


def test_explicit_noise_multiplier_is_used_as_given(tmp_path):
    cfg = PrivacyConfig(enabled=True, target_epsilon=50.0, noise_multiplier=1.3)
    plan = PrivacyLedger.open(tmp_path, cfg).plan(1, 7, 0.1)
    assert plan.noise_multiplier == 1.3
    assert plan.epsilon_after == pytest.approx(_opacus_epsilon([(1.3, 0.1, 7)], 1e-5))


def test_patient_sampler_draws_one_item_per_patient_at_rate_q():
    # patient p0 has 3 X-rays, p1 one X-ray and one CT, p2 only a CT.
    groups = {"2d": ["p0", "p0", "p0", "p1"], "3d": ["p1", "p2"]}
    sampler = PatientPoissonSampler(groups, 0.5)
    gen = torch.Generator().manual_seed(0)
    counts, empty, trials = torch.zeros(4), 0, 4000
    for _ in range(trials):
        picks = sampler.sample("2d", gen)
        patients = [groups["2d"][i] for i in picks]
        assert len(patients) == len(set(patients))  # never two rows of one patient
        empty += not picks
        for i in picks:
            counts[i] += 1
    p0_rate = float(counts[:3].sum()) / trials
    assert abs(p0_rate - 0.5) < 0.04 and abs(float(counts[3]) / trials - 0.5) < 0.04
    assert empty > 0  # Poisson batches can be empty
    assert all(groups["3d"][i] in ("p1", "p2") for i in sampler.sample("3d", gen))
    assert sampler.num_patients == 3 and sampler.patients_with("3d") == 2
    assert sample_rate_for(4, 3) == 1.0 and sample_rate_for(1, 4) == 0.25
    with pytest.raises(ValueError, match="no patients"):
        sample_rate_for(1, 0)


def test_noised_mean_clips_each_patient_and_handles_empty_batches():
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([[30.0, 40.0], [0.3, 0.4]])  # norms 50 and 0.5
    out = noised_mean(rows, clip=1.0, noise_multiplier=1e-9, expected_batch_size=2.0,
                      generator=gen)
    assert torch.allclose(out, torch.tensor([[(0.6 + 0.3) / 2, (0.8 + 0.4) / 2]]), atol=1e-5)
    empty = noised_mean(torch.zeros(0, 2), 1.0, 1.0, 2.0, gen)
    assert empty.shape == (1, 2) and bool((empty != 0).all())  # noise only


def test_site_privacy_from_node_config():
    assert site_privacy({"data-path": "/d"}) is None
    cfg = site_privacy({"dp-epsilon": 3.0, "dp-delta": 1e-6, "dp-clip": 0.5,
                        "dp-planned-rounds": 4.0})
    assert (cfg.target_epsilon, cfg.target_delta, cfg.max_grad_norm, cfg.planned_rounds) == (
        3.0, 1e-6, 0.5, 4)
    with pytest.raises(ConfigError, match="dp-clip.*without 'dp-epsilon'"):
        site_privacy({"dp-clip": 1.0})
    with pytest.raises(ConfigError, match="'dp-epsilno'"):
        site_privacy({"dp-epsilon": 1.0, "dp-epsilno": 2.0})
    with pytest.raises(ConfigError, match="target_epsilon: must be > 0"):
        site_privacy({"dp-epsilon": -1.0})


def test_refusal_metrics_are_recognised():
    assert privacy_refusal({"dp_refused": 1, "epsilon": 2.5}) == 2.5
    assert privacy_refusal({"dp_refused": 0, "epsilon": 2.5}) is None
    assert privacy_refusal(None) is None
