"""Phantoms (deterministic, labelled, realistic HU) and the `data` commands end to end."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fed_unimiss.cli.main import main
from fed_unimiss.data.phantom import make_ct_phantom, write_phantoms
from fed_unimiss.data.scan import scan


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    write_phantoms(tmp_path / "a", 2, 2, labels=True, seed=5)
    write_phantoms(tmp_path / "b", 2, 2, labels=True, seed=5)
    write_phantoms(tmp_path / "c", 2, 2, labels=True, seed=6)
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert a["nifti/case-0001.nii.gz"] != c["nifti/case-0001.nii.gz"]


def test_ct_phantom_has_organs_with_realistic_hounsfield_units():
    hu, labels, spacing = make_ct_phantom(np.random.default_rng(0), lesion=True)
    assert 40 <= hu.shape[0] <= 48 and hu.shape[1:] == (128, 128) and spacing[0] in (2.5, 3.0)
    medians = {k: float(np.median(hu[labels == k])) for k in range(1, 6) if (labels == k).any()}
    assert medians[1] == pytest.approx(-800, abs=30)  # lung
    assert medians[2] == pytest.approx(60, abs=30)  # liver
    assert medians[4] > 500  # bone
    assert 5 in medians  # lesion drawn
    assert hu.min() < -950  # air around the body


def test_labels_are_written_where_data_check_ignores_them(phantom_site):
    with open(phantom_site / "labels" / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"] for r in rows} == {"ct/case-0000", "nifti/case-0001.nii.gz",
                                         "xray/xray-0000.dcm", "xray/xray-0001.png"}
    assert {r["label"] for r in rows} <= {"0", "1"}
    assert (phantom_site / "labels" / "seg" / "case-0000.nii.gz").exists()
    report = scan(phantom_site)
    assert report.rejected == [] and len(report.usable) == 4  # labels not counted as images


def test_data_check_json_and_exit_codes(phantom_site, tmp_path, capsys):
    assert main(["data", "check", str(phantom_site), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"usable", "rejected", "summary"}
    assert result["summary"]["ct_volumes"] == 2 and result["summary"]["xrays"] == 2
    assert {u["kind"] for u in result["usable"]} == {"dicom-series", "nifti", "dicom", "image"}

    (tmp_path / "bad.dcm").write_text("nope")
    assert main(["data", "check", str(tmp_path), "--json"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["usable"] == [] and result["rejected"][0]["path"].endswith("bad.dcm")

    assert main(["data", "check", str(tmp_path / "missing")]) == 1
    assert main(["data", "check", str(phantom_site)]) == 0
    assert "Usable images" in capsys.readouterr().out


def test_data_phantom_command(tmp_path, capsys):
    assert main(["data", "phantom", str(tmp_path / "out"), "--ct", "0", "--xray", "2",
                 "--seed", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "xray").iterdir()) == \
        ["xray-0000.dcm", "xray-0001.png"]
    assert main(["data", "phantom", str(tmp_path / "x"), "--ct", "0", "--xray", "0"]) == 1
