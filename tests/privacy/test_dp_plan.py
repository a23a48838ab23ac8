"""A DP site never spends budget on an update the announced DP plan rules out.

micro-dp.yaml's plan is 2 expected patients per step; the site's own default is 4. Against it a
DP site adopts the plan (its updates are then accepted), or, with ``adopt_plan: false``, refuses
before training with the differing values named and its ledger untouched. A site that does not
know the plan (older site code: the instruction's plan key removed in transport) spends budget,
is rejected, and hears why. Real site ClientApp, real ledger, real Opacus, in process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from aggregator.inprocess import InProcessGrid
from aggregator.rounds import RoundFailed
from aggregator.simulate_cli import simulate
from fed_unimiss import exchange as ex
from fed_unimiss.privacy import PrivacyConfig, PrivacyLedger
from fed_unimiss.privacy.report import DP_PLAN_PATIENTS_PER_STEP
from site_client.dp_plan import fit_to_plan
from site_client.supernode import format_event

REPO = Path(__file__).resolve().parents[2]
SITE = PrivacyConfig(enabled=True, target_epsilon=8.0, patients_per_step=4.0)


def _config(tmp_path: Path, *extra: str) -> Path:
    """micro-dp.yaml with an absolute recipe path and ``extra`` lines in its site_privacy."""
    text = (REPO / "configs/federation/micro-dp.yaml").read_text().replace(
        "recipe: ../pretrain/micro.yaml", f"recipe: {REPO / 'configs/pretrain/micro.yaml'}")
    text = text.replace("site_privacy:\n", "site_privacy:\n" + "".join(
        f"  {line}\n" for line in extra))
    path = tmp_path / "fed.yaml"
    path.write_text(text)
    return path


def _events(out: Path, site: str = "A") -> list[dict]:
    path = out / "sites" / site / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_site_within_the_plan_keeps_its_settings():
    fit = fit_to_plan(dataclasses.replace(SITE, patients_per_step=2.0),
                      {DP_PLAN_PATIENTS_PER_STEP: 2.0})
    assert fit.privacy.patients_per_step == 2.0 and not fit.adopted and not fit.refuses
    assert fit_to_plan(SITE, {}).privacy == SITE  # no plan announced: nothing to fit


def test_a_site_above_the_plan_adopts_it_and_keeps_its_own_budget():
    fit = fit_to_plan(SITE, {DP_PLAN_PATIENTS_PER_STEP: 2.0})
    assert fit.privacy == dataclasses.replace(SITE, patients_per_step=2.0)
    assert (fit.privacy.target_epsilon, fit.privacy.target_delta, fit.privacy.max_grad_norm) \
        == (SITE.target_epsilon, SITE.target_delta, SITE.max_grad_norm)
    assert fit.adopted_text() == ("adopted the federation's DP plan: dp-patients-per-step 2 "
                                  "(this site's setting: 4)")


def test_a_site_that_keeps_its_settings_refuses_naming_both_values():
    fit = fit_to_plan(dataclasses.replace(SITE, adopt_plan=False),
                      {DP_PLAN_PATIENTS_PER_STEP: 2.0})
    assert fit.refuses and fit.privacy.patients_per_step == 4.0
    assert "dp-patients-per-step is 4 at this site, the plan accepts at most 2" \
        in fit.refusal_text()
    assert "--dp-patients-per-step 2" in fit.refusal_text()
    assert fit_to_plan(SITE, {DP_PLAN_PATIENTS_PER_STEP: "two"}).refuses  # unreadable: refuse


def test_refusing_site_spends_nothing_and_says_which_values_differ(tmp_path, xray_site):
    out = tmp_path / "run"
    # The site's ledger from earlier rounds: it must come out of the refused round byte for byte.
    ledger = PrivacyLedger.open(out / "sites" / "A", SITE)
    ledger.commit(ledger.plan(1, 3, 0.5))
    before = (out / "sites" / "A" / "privacy_ledger.json").read_bytes()
    with pytest.raises(RoundFailed, match=r"code 5105"):
        simulate(_config(tmp_path, "dp-adopt-plan: false"), [("A", xray_site)], 1, out,
                 dp_flags={"dp-patients-per-step": ["A=4"]})
    assert (out / "sites" / "A" / "privacy_ledger.json").read_bytes() == before
    assert not (out / "sites" / "A" / "site_state.json").exists()  # nothing trained or cached
    (event,) = _events(out)
    assert event["event"] == "refused"
    line = format_event("A", event)
    assert line.startswith("site A: round 1: REFUSED: this site's DP settings do not fit the "
                           "federation's announced DP plan: dp-patients-per-step is 4 at this "
                           "site, the plan accepts at most 2")
    assert "spends no privacy budget" in line
    # the coordinator sees the code's category, never the site's values
    text = (out / "logs" / "serverapp.log").read_text()
    assert "do not fit the federation's announced DP plan" in text and "code 5105" in text


@pytest.mark.slow
def test_adopting_site_trains_under_the_plan_and_every_update_is_accepted(tmp_path,
                                                                          phantom_both):
    """The issue's case: CT + X-ray site at 4 patients per step against the plan's 2."""
    out = tmp_path / "run"
    simulate(_config(tmp_path), [("A", phantom_both)], 2, out,
             dp_flags={"dp-patients-per-step": ["A=4"]})
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["sites"] for r in rows] == [["A"], ["A"]]
    assert all(r["rejected"] == {} for r in rows)
    assert rows[0]["epsilon"]["A"] < rows[1]["epsilon"]["A"] <= 8.0
    ledger = json.loads((out / "sites" / "A" / "privacy_ledger.json").read_text())
    patients = 3  # phantom_both: 1 CT volume and 2 X-rays, one patient each
    assert [q for _, q, _ in ledger["history"]] == [pytest.approx(2 / patients)] * 2
    trained = [e for e in _events(out) if e["event"] == "trained"]
    assert len(trained) == 2
    assert "adopted the federation's DP plan: dp-patients-per-step 2 (this site's setting: 4)" \
        in format_event("A", trained[0])


class _PlanUnknown(InProcessGrid):
    """Site code that predates the plan: the instruction reaches it without the plan's key."""

    def deliver(self, msg):
        if msg.metadata.message_type == ex.TRAIN:
            msg.content.config_records[ex.CONFIG].pop(DP_PLAN_PATIENTS_PER_STEP, None)
        return super().deliver(msg)


@pytest.mark.slow
def test_a_site_rejected_by_plan_hears_why_on_its_terminal(tmp_path, phantom_both):
    out = tmp_path / "run"
    with pytest.raises(RoundFailed, match=r"count samples_2d \d+ above the round's bound 48"):
        simulate(_config(tmp_path), [("A", phantom_both)], 2, out, grid_cls=_PlanUnknown,
                 dp_flags={"dp-patients-per-step": ["A=4"]})
    events = _events(out)
    rejected = [e for e in events if e["event"] == "rejected"]
    assert rejected and rejected[-1]["round"] == 2
    line = format_event("A", rejected[-1])
    assert line.startswith("site A: round 2: update REJECTED by the coordinator: count "
                           "samples_2d")
    assert "DP plan: local_steps 3 x patients_per_step 2" in line
