"""The site ClientApp's error path, the simulate CLI's argument checks, the federation config."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from aggregator.inprocess import InProcessGrid, SiteSpec
from aggregator.simulate_cli import parse_site
from fed_unimiss import exchange as ex
from fed_unimiss.config import ConfigError
from fed_unimiss.federation import load_federation
from site_client.client_app import app
from site_client.local_state import SiteSetupError, SiteState


def _train_message(grid: InProcessGrid) -> Message:
    config = ConfigRecord({ex.RECIPE_JSON: json.dumps({}), ex.ROUND: 1, ex.LOCAL_STEPS: 1,
                           ex.START_STEP: 0, ex.TOTAL_STEPS: 1, ex.EVAL_BATCHES: 1})
    msg = Message(RecordDict({ex.ARRAYS: ArrayRecord({"center": torch.zeros(1, 4)}),
                              ex.CONFIG: config}), 1, ex.TRAIN, group_id="1")
    grid.push_messages([msg])
    return msg


def test_site_failure_replies_a_fixed_error_without_local_details(tmp_path, caplog):
    empty = tmp_path / "secret-patient-folder"
    empty.mkdir()
    grid = InProcessGrid(app, [SiteSpec("A", empty)], tmp_path / "state")
    msg = _train_message(grid)
    reply = app(msg, grid.contexts[1])
    assert reply.has_error() and not reply.has_content()
    assert "secret-patient-folder" not in reply.error.reason
    # a fixed text, led by the site's own label (so the coordinator can name the site)
    assert reply.error.reason == "site=A; site could not train this round; see the site log"
    assert ex.error_site(reply.error.reason) == "A"
    assert "training failed" in caplog.text  # the details stay in the site's own log
    # ... and on the site's terminal (progress.jsonl, read by `site start`), never in the reply
    events = [json.loads(line) for line in
              (tmp_path / "state" / "A" / "progress.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "failed" and "secret-patient-folder" in events[-1]["why"]


def test_error_site_accepts_only_a_valid_label():
    assert ex.error_site("site=B; text") == "B"
    assert ex.error_site("site=/data/patient 17; text") is None
    assert ex.error_site("no label") is None
    assert ex.error_reason("/etc/passwd", "fixed") == "fixed"


def test_node_config_errors_name_the_key(tmp_path):
    with pytest.raises(SiteSetupError, match="'data-path' missing"):
        SiteState.from_node_config({ex.NODE_STATE_DIR: str(tmp_path)})
    with pytest.raises(SiteSetupError, match="is not a folder"):
        SiteState.from_node_config({ex.NODE_DATA_PATH: str(tmp_path / "nope"),
                                    ex.NODE_STATE_DIR: str(tmp_path)})
    state = SiteState.from_node_config({ex.NODE_DATA_PATH: str(tmp_path),
                                        ex.NODE_STATE_DIR: str(tmp_path / "s")})
    assert state.position() == {} and state.site_name is None
    labelled = SiteState.from_node_config({ex.NODE_DATA_PATH: str(tmp_path),
                                           ex.NODE_STATE_DIR: str(tmp_path / "s"),
                                           ex.NODE_SITE_NAME: "/data/Jane Doe"})
    assert labelled.site_name is None  # not a plain label: never sent
    state.record_position(2, 4, 4, 8)
    assert state.position() == {"round": 2, "start_step": 4, "end_step": 8, "total_steps": 8}


def test_parse_site():
    assert parse_site("A=/data/a")[0] == "A"
    for bad in ("A", "=/x", "a b=/x", "../x=/y"):
        with pytest.raises(Exception, match="--site"):
            parse_site(bad)


def test_federation_config_errors_name_the_field(tmp_path):
    path = tmp_path / "fed.yaml"
    path.write_text("min_sites: 0\n")
    with pytest.raises(ConfigError, match="min_sites: must be >= 1"):
        load_federation(path)
    path.write_text("aggregation: average\n")
    with pytest.raises(ConfigError, match="aggregation"):
        load_federation(path)
    path.write_text("local_step: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'local_steps'"):
        load_federation(path)


def test_shipped_micro_federation_config_loads(tmp_path):
    from pathlib import Path

    from aggregator.rounds import FederationRun

    config = Path(__file__).resolve().parents[2] / "configs" / "federation" / "micro.yaml"
    run = FederationRun.from_files(config, tmp_path / "run", 2)
    assert run.recipe.model.preset == "micro" and run.recipe.ssl.steps_per_epoch == 2
    assert run.identity()["rounds"] == 2

