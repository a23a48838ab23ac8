"""The JSON API over real ``simulate`` runs: what it shows, what it never shows, run states.

The finished run has 3 sites over 3 rounds; site A trains with DP (epsilon 8 over 2 rounds), so
its round-3 reply is a budget refusal. Numbers served are checked against rounds.jsonl; the
privacy test looks for paths, DICOM patient identifiers, pixel-sized arrays and the sites' log
lines in every response.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from dash_helpers import (
    FED_UNIMISS,
    federation_config,
    http_get,
    serving,
    simulate_command,
    simulate_env,
)

pytestmark = pytest.mark.slow

RUN_KEYS = {"name", "kind", "state", "why", "run_id", "rounds_done", "rounds_target",
            "started_at", "seconds_per_round", "eta_s", "last_round_at", "sites", "last_loss",
            "sites_registered", "sites_online", "online_at", "now", "refresh_s"}
ROUND_KEYS = {"round", "ended_at", "loss", "eval_loss", "samples_2d", "samples_3d", "samples",
              "seconds", "bytes_in", "bytes_out_per_site", "bytes_out", "sites", "per_site",
              "eval_per_site", "epsilon", "epsilon_budget", "rejected", "missing_nodes",
              "absent", "teacher_entropy", "site_compute_s", "coordination_s", "probe"}
SITE_KEYS = {"site", "last_seen_round", "last_seen_at", "rounds_joined", "rejections",
             "rejection_reasons", "samples_2d", "samples_3d", "last_loss", "dp", "epsilon",
             "epsilon_budget", "registered", "online"}


def _api(base: str) -> dict:
    out = {}
    for name in ("run", "rounds", "sites"):
        status, headers, body = http_get(f"{base}/api/{name}")
        assert status == 200 and headers["content-type"] == "application/json"
        out[name] = json.loads(body)
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_api_serves_state_rounds_and_sites_of_a_finished_run(finished_run):
    rows = _rows(finished_run.out)
    with serving(finished_run.out) as server:
        api = _api(f"http://127.0.0.1:{server.port}")
    run, rounds, sites = api["run"], api["rounds"], api["sites"]
    assert set(run) == RUN_KEYS and all(set(r) == ROUND_KEYS for r in rounds)
    assert all(set(s) == SITE_KEYS for s in sites)
    assert (run["state"], run["why"], run["kind"]) == ("finished", None, "simulate")
    assert (run["rounds_done"], run["rounds_target"], run["sites"]) == (3, 3, 3)
    # simulate: no SuperLink, so no registered sites and nobody "online"
    assert (run["sites_registered"], run["sites_online"], run["run_id"]) == ([], None, None)
    assert run["eta_s"] is None and run["seconds_per_round"] == pytest.approx(
        sum(r["seconds"] for r in rows) / 3)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for got, row in zip(rounds, rows, strict=True):
        assert got["loss"] == pytest.approx(row["loss"])
        assert got["sites"] == row["sites"] and got["bytes_in"] == row["bytes_in"]
        assert got["bytes_out"] == row["bytes_out_per_site"] * len(row["sites"])
        # simulate runs its sites one after another: their times add up to the compute part
        compute = sum(v["seconds"] for v in row["per_site"].values() if "seconds" in v)
        assert got["site_compute_s"] == pytest.approx(compute)
        assert got["site_compute_s"] + got["coordination_s"] == pytest.approx(row["seconds"])
        assert got["ended_at"] is not None
    assert rounds[2]["sites"] == ["B", "C"] and "A" in rounds[2]["rejected"]
    by_name = {s["site"]: s for s in sites}
    assert sorted(by_name) == ["A", "B", "C"]
    for name, site in by_name.items():
        joined = [r for r in rows if name in r["sites"]]
        assert site["rounds_joined"] == len(joined)
        assert site["samples_2d"] == sum(r["per_site"][name]["samples_2d"] for r in joined)
        assert site["samples_3d"] == sum(r["per_site"][name]["samples_3d"] for r in joined)
        assert site["last_seen_round"] == 3
    a = by_name["A"]
    assert a["dp"] and a["epsilon_budget"] == 8.0 and 0 < a["epsilon"] <= 8.0
    assert a["epsilon"] == pytest.approx(rows[-1]["epsilon"]["A"])
    assert a["rejections"] == 1 and "privacy budget exhausted" in a["rejection_reasons"][0]
    assert not by_name["B"]["dp"] and by_name["B"]["epsilon"] is None
    assert by_name["C"]["samples_3d"] > 0 and by_name["B"]["samples_3d"] == 0


def _strings(value, found: list[str]) -> list[str]:
    if isinstance(value, str):
        found.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            found.append(str(k))
            _strings(v, found)
    elif isinstance(value, list):
        for v in value:
            _strings(v, found)
    return found


def _longest_number_list(value) -> int:
    if isinstance(value, list):
        own = len(value) if all(isinstance(v, (int, float)) for v in value) else 0
        return max([own] + [_longest_number_list(v) for v in value])
    if isinstance(value, dict):
        return max([0] + [_longest_number_list(v) for v in value.values()])
    return 0


def _site_log_lines(output: str) -> list[str]:
    """The message part of every log line the sites (and the coordinator) printed."""
    lines = []
    for line in output.splitlines():
        m = re.match(r"^\S+ (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: (.*)$", line)
        text = (m.group(1) if m else line).strip()
        if len(text) >= 20:
            lines.append(text)
    return lines


def test_no_pixel_path_patient_identifier_or_log_line_in_any_response(finished_run):
    patients = set()
    for folder in finished_run.sites.values():
        for path in folder.rglob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            patients.update({str(ds.PatientID), str(ds.PatientName)})
    assert patients, "the phantom sites hold DICOM files with patient identifiers"
    log_lines = _site_log_lines(finished_run.output)
    assert any("site" in line or "cache" in line or "phantom" in line.lower()
               for line in log_lines), "the run printed the sites' log lines"
    forbidden = patients | {str(finished_run.out), str(finished_run.out.parent)} | {
        str(p) for p in finished_run.sites.values()} | {p.name for p in finished_run.sites.values()}
    with serving(finished_run.out) as server:
        base = f"http://127.0.0.1:{server.port}"
        bodies = {route: http_get(base + route)[2].decode()
                  for route in ("/", "/api/run", "/api/rounds", "/api/sites")}
    for route, body in bodies.items():
        for secret in forbidden:
            assert secret not in body, (route, secret)
        assert "/tmp" not in body and "/work" not in body and "/home" not in body, route
        for line in log_lines:
            assert line not in body, (route, line)
        if route.startswith("/api/"):
            data = json.loads(body)
            # pixels would be long arrays of numbers; the API's longest is a list of node ids
            assert _longest_number_list(data) <= 3, route
            for text in _strings(data, []):
                assert not re.search(r"[\\/]", text), (route, text)
            assert len(body) < 32_000, (route, len(body))


def test_fields_that_are_not_allow_listed_never_reach_a_response(finished_run, tmp_path):
    """A rounds.jsonl with paths in every free-text place (a future or buggy writer)."""
    out = tmp_path / "run"
    shutil.copytree(finished_run.out, out, ignore=shutil.ignore_patterns("*.safetensors", "sites"))
    rows = _rows(out)
    secret = "/data/hospital-x/patient-4711/ct.dcm"
    hostile = dict(rows[-1], round=4, note=secret, site_path=secret,
                   sites=["B", secret], rejected={"C": f"cannot read {secret}", secret: "x"},
                   per_site={"B": dict(rows[-1]["per_site"]["B"], file=secret, pixels=[1] * 4096),
                             secret: {"loss": 1.0}},
                   epsilon={"B": 1.0, secret: 2.0}, eval_per_site={secret: 1.0},
                   absent=["A", secret], missing_nodes=[1263004151004305773, secret])
    with open(out / "rounds.jsonl", "a") as f:
        f.write(json.dumps(hostile) + "\n")
    (out / "sites-online.json").write_text(json.dumps(
        {"registered": ["A", "B", secret], "online": ["B", secret], "at": 1.0,
         "pid": os.getpid(), "host": socket.gethostname()}))
    (out / "aggregator.json").write_text(json.dumps({"run_id": 1263004151004305773,
                                                     "status": "started", "rounds": 4}))
    with serving(out) as server:
        api = _api(f"http://127.0.0.1:{server.port}")
    text = json.dumps(api)
    assert "hospital-x" not in text and "pixels" not in text
    # the patient number on its own, not the same digits inside a loss such as 5.847112
    assert not re.search(r"(?<![\d.])4711(?!\d)", text), text
    assert _longest_number_list(api) <= 3
    assert api["rounds"][-1]["round"] == 4
    assert api["rounds"][-1]["rejected"] == {"C": "cannot read …"}
    assert api["rounds"][-1]["absent"] == ["A"]
    # 64-bit ids as text: JavaScript's numbers would round ...773 to ...800
    assert api["rounds"][-1]["missing_nodes"] == ["1263004151004305773"]
    assert api["run"]["run_id"] == "1263004151004305773"
    assert (api["run"]["sites_registered"], api["run"]["sites_online"]) == (["A", "B"], ["B"])
    assert {s["site"]: (s["registered"], s["online"]) for s in api["sites"]} == \
        {"A": (True, False), "B": (True, True), "C": (False, False)}


def _wait_for(base: str, check, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    run: dict = {}
    while time.monotonic() < deadline:
        run = json.loads(http_get(f"{base}/api/run")[2])
        if check(run):
            return run
        time.sleep(0.2)
    raise AssertionError(f"timed out; last /api/run: {run}")


def test_running_then_killed_run_reads_running_with_an_estimate_then_failed(sites, tmp_path):
    out = tmp_path / "run"
    cmd = simulate_command(federation_config(tmp_path), {"B": sites["B"]}, 30, out)
    with serving(out) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert json.loads(http_get(f"{base}/api/run")[2])["state"] == "waiting"
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=simulate_env())
        try:
            run = _wait_for(base, lambda r: r["rounds_done"] >= 1)
            assert (run["state"], run["rounds_target"]) == ("running", 30)
            assert run["eta_s"] is not None and run["eta_s"] > 0
        finally:
            proc.send_signal(signal.SIGKILL)  # no chance to record an outcome
            proc.wait(timeout=60)
        run = _wait_for(base, lambda r: r["state"] != "running", timeout=30)
    assert run["state"] == "failed" and "without recording an outcome" in run["why"]
    assert run["eta_s"] is None


def test_failed_run_says_why_and_status_agrees(sites, tmp_path):
    out = tmp_path / "run"
    # min_sites 2 with one site: round 1 cannot reach its quorum by the 1 s deadline
    config = federation_config(tmp_path, min_sites=2, round_timeout=1)
    proc = subprocess.run(simulate_command(config, {"B": sites["B"]}, 2, out),
                          capture_output=True, text=True, timeout=600, env=simulate_env())
    assert proc.returncode == 1, proc.stdout[-2000:]
    with serving(out) as server:
        run = json.loads(http_get(f"http://127.0.0.1:{server.port}/api/run")[2])
    assert run["state"] == "failed" and run["rounds_done"] == 0
    assert "RoundFailed" in run["why"] and "min_sites=2" in run["why"]
    assert str(tmp_path) not in run["why"] and "/" not in run["why"]
    status = subprocess.run([str(FED_UNIMISS), "aggregator", "status", "--out", str(out),
                             "--json"], capture_output=True, text=True, timeout=120,
                            env={**os.environ})
    summary = json.loads(status.stdout)
    assert (summary["state"], summary["why"]) == (run["state"], run["why"])
