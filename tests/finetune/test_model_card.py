"""The model card (README.md of every export): its facts are the run's records, and it holds no
path, file name or anything about an individual image.

Real runs on phantom data: a federation in process (``simulate``: site A with DP, site B without,
B holding a labelled probe set, federated evaluation on) and a centralized ``pretrain``, each
exported with ``fed-unimiss export``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from micro_checkpoint import micro_checkpoint

from fed_unimiss.cli.main import main as cli_main
from fed_unimiss.data.phantom import write_phantoms
from fed_unimiss.finetune.export import export_checkpoint
from fed_unimiss.finetune.model_card import NOT_RECORDED
from fed_unimiss.privacy.config import PrivacyConfig

REPO = Path(__file__).resolve().parents[2]

# Folder names a leak would show: the sites' data, the probe set, the run.
SITE_A, SITE_B, PROBE, RUN = "hospital-alpha-pacs", "hospital-beta-pacs", "probe-set-beta", \
    "run-secret-name"

FEDERATION = """recipe: {recipe}
recipe_overrides:
  model: {{head_weight_norm: false}}
  ssl: {{steps_per_epoch: 2, batch_size_2d: 4, batch_size_3d: 1, threads: 1, koleo_weight: 0.0}}
local_steps: 2
min_sites: 2
round_timeout: 900
max_update_norm: null
norm_factor: 5.0
min_cosine: -0.1
aggregation: mean
trim_fraction: 0.1
evaluate: true
eval_batches: 1
poll_interval: 0.2
probe_every: 2
exchange: {{down: q8_delta, up: q8_delta, teacher: exchanged}}
"""


def _sections(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    _, front, body = card.split("---\n", 2)
    return yaml.safe_load(front), body


def _leaks(card: str, roots: list[Path], names: list[str]) -> list[str]:
    """Every file name and stem under ``roots``, each of ``names`` (the distinctive folder
    names and tmp paths) and anything shaped like a path or a file name, found in the card."""
    words = set(names) | {str(root) for root in roots}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():  # the run's own folders (logs, sites, ...) are machinery words
                words.add(p.name)  # case-0000.nii.gz
                stem = p.name.split(".")[0]
                if re.search(r"[\d-]", stem):  # case-0000 (not "rounds" of rounds.jsonl)
                    words.add(stem)
    found = [w for w in words if w in card]
    found += re.findall(r"[A-Za-z_~.][\w.-]*/[A-Za-z_][\w./-]*", card)  # path-shaped
    found += re.findall(r"\b[\w-]+\.(?:nii|gz|png|dcm|json|jsonl|yaml|safetensors|pt|mha)\b",
                        card)
    return found


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
    from aggregator.simulate_cli import simulate
    from fed_unimiss import exchange as ex

    base = tmp_path_factory.mktemp("card-fed")
    write_phantoms(base / SITE_A, n_ct=1, n_xray=2, seed=3, fmt="nifti")
    write_phantoms(base / SITE_B, n_ct=1, n_xray=2, seed=4, fmt="nifti")
    write_phantoms(base / PROBE, n_ct=2, n_xray=0, seed=5, fmt="nifti", labels=True)
    config = base / "fed.yaml"
    config.write_text(FEDERATION.format(recipe=REPO / "configs/pretrain/micro.yaml"))
    run = base / RUN
    simulate(config, [("A", base / SITE_A), ("B", base / SITE_B)], 2, run,
             dp_flags={"dp-epsilon": ["A=8"], "dp-planned-rounds": ["A=2"],
                       "dp-patients-per-step": ["A=1"]},
             probes={"B": ex.probe_node_config(base / PROBE, "seg3d",
                                               REPO / "configs/probe/seg3d-micro.yaml")})
    out = base / "published"
    assert cli_main(["export", str(run / "global_round_0002.safetensors"), "--out",
                     str(out)]) == 0
    rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    meta = json.loads((run / "global_round_0002.json").read_text())
    return base, out, rows, meta


@pytest.fixture(scope="module")
def centralized(tmp_path_factory):
    base = tmp_path_factory.mktemp("card-central")
    write_phantoms(base / SITE_A, n_ct=1, n_xray=2, seed=7, fmt="nifti")
    run = base / RUN
    assert cli_main(["pretrain", "--config", str(REPO / "configs/pretrain/micro.yaml"),
                     "--data", str(base / SITE_A), "--out", str(run), "--steps", "2",
                     "--no-progress"]) == 0
    out = base / "published"
    assert cli_main(["export", str(run / "ckpt_00000002.safetensors"), "--out", str(out),
                     "--which", "teacher"]) == 0
    meta = json.loads((run / "ckpt_00000002.json").read_text())
    return base, out, meta


@pytest.mark.slow
def test_federated_card_says_what_the_records_say(federated):
    _, out, rows, meta = federated
    front, body = _sections((out / "README.md").read_text())
    assert "federated-learning" in front["tags"] and "differential-privacy" in front["tags"]
    for title in ("## What it is", "## How it was trained", "## Training data", "## Privacy",
                  "## Quality", "## Intended use and limitations"):
        assert title in body
    assert "Federated pretraining: 2 round(s) completed (of 2 planned), 2 local steps" in body
    assert f"| exchange (codecs down / up, teacher) | {rows[-1]['exchange']} |" in body
    assert "| aggregation | mean (trim fraction 0.1) |" in body
    assert "| preset | micro |" in body and "| network | student |" in body
    assert "Hounsfield units divided by 1024" in body and "3 x 1 x 1 mm" in body
    # per site: samples summed over the round log; A spent epsilon against its budget of 8
    for site in ("A", "B"):
        s2 = sum(r["per_site"][site]["samples_2d"] for r in rows if site in r["per_site"])
        s3 = sum(r["per_site"][site]["samples_3d"] for r in rows if site in r["per_site"])
        assert f"| {site} | 2 | {s2} | {s3} |" in body
    spent = meta["round_log"]["epsilon"]["A"]
    assert 0 < spent <= 8.0 and "B" not in meta["round_log"]["epsilon"]
    delta = PrivacyConfig().target_delta  # site A's delta: the default, as each row reports it
    assert all(r["dp_delta"] == {"A": delta} for r in rows)
    assert f"| A | yes | {spent:.4g} | 8 | {delta:.4g} |" in body
    assert "| B | no (none reported) | - | - | - |" in body
    # quality: the federated evaluation of every round and the probe of round 1 (probe_every 2)
    for r in rows:
        assert f"| {r['round']} | {r['eval_loss']:.4g} | B {r['eval_loss']:.4g} |" in body
    probed = [r for r in rows if "probe" in r]
    assert [r["round"] for r in probed] == [1]
    stage4 = probed[0]["probe"]["weighted"]["teacher"]["stage4"]["knn"]
    assert "After 0 round(s) (round 1, sites B" in body
    assert re.search(rf"\| stage4 \| {re.escape(f'{stage4:.4g}')} \|", body)


@pytest.mark.slow
def test_federated_card_holds_no_path_or_file_name(federated):
    base, out, _, _ = federated
    card = (out / "README.md").read_text()
    leaks = _leaks(card, [base / SITE_A, base / SITE_B, base / PROBE, base / RUN],
                   [str(base), SITE_A, SITE_B, PROBE, RUN, "global_round", "rounds.jsonl"])
    assert leaks == []


@pytest.mark.slow
def test_centralized_card_says_what_the_records_say_and_holds_no_path(centralized):
    base, out, meta = centralized
    card = (out / "README.md").read_text()
    front, body = _sections(card)
    assert "federated-learning" not in front["tags"]
    assert "| network | teacher (the EMA of the student) |" in body
    assert "Centralized pretraining on pooled data: 2 steps (of " \
           f"{meta['total_steps']} in the schedule)" in body
    assert f"- CT volumes: {meta['data']['ct_volumes']}" in body
    assert f"- X-rays: {meta['data']['xrays']}" in body
    assert f"| koleo_weight | {meta['recipe']['ssl']['koleo_weight']:.4g} |" in body
    assert f"Last recorded training loss: {meta['metrics']['loss']:.4g}" in body
    assert f"Evaluation: {NOT_RECORDED} with this run" in body
    assert _leaks(card, [base / SITE_A, base / RUN], [str(base), SITE_A, RUN, "ckpt_"]) == []


def test_card_drops_path_shaped_records_and_marks_gaps(tmp_path):
    """A record holding a path where a label or setting belongs never reaches the card; what
    the records lack is "not recorded", not a default."""
    secret = "/mnt/pacs/patient-0042/scan.nii.gz"
    meta = {"round": 1,
            "round_log": {"round": 1, "exchange": secret,
                          "per_site": {secret: {"samples_2d": 3, "samples_3d": 1},
                                       "A": {"samples_2d": 5, "samples_3d": 2}},
                          "epsilon": {"A": 1.5}},
            "run": {"federation": {"aggregation": "scan-0042.dcm"}}}
    path, _, _ = micro_checkpoint(tmp_path / "run", "global_round_0001", seed=0, meta=meta)
    card = (export_checkpoint(path, tmp_path / "out") / "README.md").read_text()
    assert "patient-0042" not in card and "scan-0042" not in card and "/mnt" not in card
    assert "| A | 1 | 5 | 2 |" in card  # no round log: the sidecar's last round
    assert f"| exchange (codecs down / up, teacher) | {NOT_RECORDED} |" in card
    assert f"| aggregation | {NOT_RECORDED} (trim fraction {NOT_RECORDED}) |" in card
    assert f"| A | yes | 1.5 | {NOT_RECORDED} | {NOT_RECORDED} |" in card
    assert f"| lr | {NOT_RECORDED} |" in card  # the micro record holds no ssl section
