"""``require_dp`` over a real in-process federation, the coordinator's own log file, and
``aggregator status`` showing each site's epsilon from the rounds.jsonl that run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aggregator.inprocess import InProcessGrid
from fed_unimiss import exchange as ex
from fed_unimiss.privacy import REQUIRE_DP

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, require_dp: bool) -> Path:
    """micro-dp.yaml without its all-sites DP block (DP is given per site by flags here)."""
    text = (REPO / "configs/federation/micro-dp.yaml").read_text()
    text = text.replace("recipe: ../pretrain/micro.yaml",
                        f"recipe: {REPO / 'configs/pretrain/micro.yaml'}")
    text = text.split("site_privacy:")[0] + f"require_dp: {str(require_dp).lower()}\n"
    path = tmp_path / "fed.yaml"
    path.write_text(text)
    return path


class _IgnoresRequirement(InProcessGrid):
    """Sites running code that ignores ``require-dp``: the aggregator alone must reject them."""

    def deliver(self, msg):
        if msg.metadata.message_type == ex.TRAIN:
            msg.content.config_records[ex.CONFIG].pop(REQUIRE_DP, None)
        return super().deliver(msg)


@pytest.fixture(scope="module")
def required_run(tmp_path_factory, xray_site, xray_site_b) -> Path:
    """One round: A without DP, B with DP (epsilon 8 over 2 planned rounds), require_dp on."""
    from aggregator.simulate_cli import simulate

    tmp = tmp_path_factory.mktemp("require-dp")
    out = tmp / "run"
    simulate(_config(tmp, True), [("A", xray_site), ("B", xray_site_b)], 1, out,
             dp_flags={"dp-epsilon": ["B=8"], "dp-planned-rounds": ["B=2"],
                       "dp-patients-per-step": ["B=2"]})
    return out


@pytest.mark.slow
def test_non_dp_site_refuses_and_dp_site_is_folded(required_run, xray_site):
    row = json.loads((required_run / "rounds.jsonl").read_text().splitlines()[0])
    assert row["sites"] == ["B"]
    # named by its label (carried in the error reply), with the code's public category
    assert row["rejected"] == {"A": "refused: the federation requires DP and the site has none "
                                     "(code 5103)"}
    assert 0 < row["epsilon"]["B"] <= 8.0 and "A" not in row["epsilon"]
    # The non-DP site trained nothing: no schedule position was ever recorded in its state.
    assert not any((required_run / "sites" / "A").rglob("*position*"))
    # The coordinator's own log (aggregator.*) reached RUN/logs/serverapp.log, with reasons and
    # labels but no site file paths.
    text = (required_run / "logs" / "serverapp.log").read_text()
    assert "federation requires differential privacy" in text
    assert "rejected reply of A" in text and "code 5103" in text
    assert "folded B" in text
    assert str(xray_site) not in text and "xray-0" not in text  # site-side logs stay out


@pytest.mark.slow
def test_aggregator_rejects_a_non_dp_reply_when_the_site_ignores_the_flag(tmp_path, xray_site):
    from aggregator.rounds import RoundFailed
    from aggregator.simulate_cli import simulate

    out = tmp_path / "run"
    with pytest.raises(RoundFailed, match=r"code 5103"):
        simulate(_config(tmp_path, True), [("A", xray_site)], 1, out,
                 grid_cls=_IgnoresRequirement)
    text = (out / "logs" / "serverapp.log").read_text()
    assert "sent a train reply without DP (no epsilon)" in text  # A did train and reply
    assert "federation stopped" in text


@pytest.mark.slow
def test_status_shows_epsilon_per_site_from_a_real_dp_run(required_run, capsys):
    from aggregator.deploy.runner import run_summary
    from fed_unimiss.cli.main import main

    row = json.loads((required_run / "rounds.jsonl").read_text().splitlines()[0])
    eps_b = row["epsilon"]["B"]
    assert run_summary(required_run)["epsilon"] == {"B": eps_b}
    assert main(["aggregator", "status", "--out", str(required_run)]) == 0
    out = capsys.readouterr().out
    assert f"DP epsilon:  B {eps_b:.3f} (per patient, spent so far)" in out
    assert main(["aggregator", "status", "--out", str(required_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == {"B": eps_b}
