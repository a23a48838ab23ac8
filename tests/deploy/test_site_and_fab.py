"""Site start's checks before any network I/O, the FAB's contents, status of a RUN folder."""

from __future__ import annotations

import io
import json
import tomllib
import zipfile

import pytest

from aggregator.deploy.fab import CLIENTAPP, SERVERAPP, FabSpec, build_fab
from aggregator.deploy.runner import RoundsTail, run_summary
from aggregator.provision import provision
from fed_unimiss.cli.main import main


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return provision(["A"], tmp_path_factory.mktemp("k") / "KITS").sites["A"]


def test_site_start_refuses_a_folder_with_nothing_usable(tmp_path, kit, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("no images here")
    (data / "broken.dcm").write_bytes(b"\0" * 300)
    code = main(["site", "start", "--kit", str(kit), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2
    assert "no usable CT volume or X-ray" in err and str(data) in err
    assert "fed-unimiss data check" in err
    assert not (kit / "state" / "logs" / "supernode.log").exists()  # never got to the network


def test_site_start_refuses_a_missing_folder_and_a_non_kit(tmp_path, kit, capsys):
    assert main(["site", "start", "--kit", str(kit), "--data", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["site", "start", "--kit", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a site kit" in capsys.readouterr().err


def test_site_check_only_reports_counts_of_phantom_data(tmp_path, kit, capsys):
    from fed_unimiss.data.phantom import write_phantoms

    write_phantoms(tmp_path / "data", 0, 2, seed=3)
    code = main(["site", "start", "--kit", str(kit), "--data", str(tmp_path / "data"),
                 "--check-only"])
    out = capsys.readouterr().out
    assert code == 0
    assert "0 CT volume(s), 2 X-ray(s)" in out
    assert "xray-0000" not in out  # counts only, no file names


def test_fab_holds_only_generated_metadata_naming_installed_components():
    fab, digest = build_fab(FabSpec(run_config={"config": "/abs/f.yaml", "out": "/abs/RUN",
                                                "rounds": 3, "resume": True}))
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert sorted(names) == [".info/CONTENT", "LICENSE", "pyproject.toml"]
    meta = tomllib.loads(zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode())
    app = meta["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVERAPP, "clientapp": CLIENTAPP}
    assert app["config"] == {"config": "/abs/f.yaml", "out": "/abs/RUN", "rounds": 3,
                             "resume": True}
    assert len(fab) < 4096 and len(digest) == 64


def test_rounds_tail_returns_complete_lines_once(tmp_path):
    log = tmp_path / "rounds.jsonl"
    tail = RoundsTail(log)
    assert tail.read_new() == []
    log.write_text(json.dumps({"round": 1}) + "\n" + '{"round": 2')  # torn second line
    assert tail.read_new() == [{"round": 1}]
    with open(log, "a") as f:
        f.write("}\n")
    assert tail.read_new() == [{"round": 2}]
    assert tail.read_new() == []


def test_rounds_tail_survives_a_resume_repair_followed_by_an_append(tmp_path):
    """A resumed run rewrites rounds.jsonl (shorter rows) and appends the next round before the
    tail looks again: that round must still come out, exactly once, and round 1 not again."""
    log = tmp_path / "rounds.jsonl"
    log.write_text(json.dumps({"round": 1, "sites": ["A", "B"], "note": "x" * 80}) + "\n")
    tail = RoundsTail(log)  # the resumed aggregator starts here
    log.write_text(json.dumps({"round": 1, "sites": ["A", "B"]}) + "\n")  # the repair
    with open(log, "a") as f:
        f.write(json.dumps({"round": 2, "sites": ["A", "B"]}) + "\n")
    assert tail.read_new() == [{"round": 2, "sites": ["A", "B"]}]
    assert tail.read_new() == []


def test_status_of_a_run_folder(tmp_path, capsys):
    run = tmp_path / "RUN"
    run.mkdir()
    rows = [{"round": 1, "sites": ["A", "B"], "loss": 9.5},
            {"round": 2, "sites": ["B", "C"], "loss": 8.25}]
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_summary(run)
    assert s["rounds_done"] == 2 and s["sites_seen"] == ["A", "B", "C"] and s["last_loss"] == 8.25
    assert s["sites_last_round"] == ["B", "C"] and s["sites_missing"] == ["A"]
    assert main(["aggregator", "status", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "rounds done: 2" in out and "8.2500" in out
    # the sites training now, and who dropped out (a partial resume), not "A, B, C"
    assert "sites:       B, C in round 2; not in it: A (seen in earlier rounds)" in out
    assert main(["aggregator", "status", "--out", str(tmp_path / "missing")]) == 2
