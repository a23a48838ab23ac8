"""``data check`` as a person reads it: names relative to the folder, distinct at 80 columns,
and no spacing claimed where the file records none."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fed_unimiss.cli.names import unique_tails

FOLDER = "UniMiSS_reference_dataset_chest_xray_export_2024"
STEM = "UniMiSS_patient_chest_radiograph_posteroanterior"


def _check(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fed_unimiss.cli.main", "data", "check", *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def long_names(tmp_path_factory) -> Path:
    """19 PNG radiographs whose names differ only at the end, in two nested folders, and one
    rejected file with a long name."""
    root = tmp_path_factory.mktemp("refdata")
    rng = np.random.default_rng(0)
    for i in range(19):
        folder = root / FOLDER / ("batch_one" if i < 10 else "batch_two")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((72, 72)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{STEM}_{i % 10:04d}.png")
    (root / FOLDER / "batch_one" / f"{STEM}_notes.txt").write_text("not an image")
    return root


def _image_cells(stdout: str) -> list[str]:
    """The image column of the usable table, a wrapped cell joined again."""
    cells: list[str] = []
    for line in stdout.splitlines():
        if not line.startswith("│"):
            continue
        cols = line.split("│")
        if cols[1].strip() == "xray":
            cells.append(cols[2].strip())
        elif cols[1].strip() == "" and cells and len(cols) > 6:
            cells[-1] += cols[2].strip()
        if line.startswith("└"):
            break
    return cells


def test_names_at_80_columns_are_distinct_and_fit(long_names):
    """One folder of 10 similar names: each prints on one line, distinct, within 80 columns."""
    out = _check(str(long_names / FOLDER / "batch_one"))
    assert out.returncode == 0, out.stderr
    names = _image_cells(out.stdout)
    assert len(names) == 10
    assert len(set(names)) == 10, names
    assert all(len(line) <= 80 for line in out.stdout.splitlines())
    assert all(n.startswith("…") and n.endswith(".png") for n in names)  # cut on the left
    assert sum(line.startswith("│ xray") for line in out.stdout.splitlines()) == 10  # one line each
    # the rejected file is named and distinct from the images
    assert "notes.txt" in out.stdout and "not an image file" in out.stdout


def test_same_file_names_in_two_folders_stay_apart_at_80_columns(long_names):
    """batch_one/X and batch_two/X share every short tail: the unique tail is printed whole
    (wrapped), so no two rows read the same."""
    out = _check(str(long_names))
    assert out.returncode == 0, out.stderr
    names = _image_cells(out.stdout)
    assert len(names) == 19
    assert len(set(names)) == 19, names
    assert all(len(line) <= 80 for line in out.stdout.splitlines())
    assert not any(n.endswith("…") for n in names)


def test_wide_terminal_shows_full_relative_names(long_names):
    out = _check(str(long_names), columns=250)
    names = _image_cells(out.stdout)
    assert f"{FOLDER}/batch_one/{STEM}_0000.png" in names
    assert not any(long_names.name in n for n in names)  # relative to the scanned folder


def test_json_keeps_full_relative_paths_and_null_spacing(long_names):
    out = _check(str(long_names), "--json")
    result = json.loads(out.stdout)
    names = sorted(u["name"] for u in result["usable"])
    assert names[0] == f"{FOLDER}/batch_one/{STEM}_0000.png"
    assert len(set(names)) == 19
    assert all(u["spacing"] is None for u in result["usable"])  # PNG: no spacing recorded
    assert result["rejected"][0]["path"] == f"{FOLDER}/batch_one/{STEM}_notes.txt"


def test_png_spacing_is_unknown_in_the_table(long_names):
    out = _check(str(long_names), columns=120)
    assert re.search(r"│ 72 x 72 │ unknown", out.stdout), out.stdout
    assert "1 x 1" not in out.stdout


def test_unique_tails_keeps_shared_tails_apart():
    names = ["a/x/IM-0001.dcm", "b/x/IM-0001.dcm", "b/x/IM-0002.dcm", "short.png"]
    shown = unique_tails(names, 12)
    assert len(set(shown)) == len(names)
    assert shown[3] == "short.png"
    assert shown[2] == "…IM-0002.dcm"  # "…/IM-0002.dcm" is 13 wide
    # every tail of these two is shared, so both print whole
    assert shown[:2] == names[:2]
    assert unique_tails(names, 100) == names


def _columns(stdout: str, frame: str) -> list[list[str]]:
    """The cells of every row drawn with ``frame`` (┃ header, │ body), a wrapped cell's lines
    joined with a space; a row starts where its first cell is not empty."""
    rows: list[list[str]] = []
    for line in stdout.splitlines():
        if not line.startswith(frame):
            continue
        cells = [c.strip() for c in line.strip()[1:-1].split(frame)]
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
        if frame == "┃" and len(rows) > 1:  # headers: one row, however many lines
            rows[0] = [f"{a} {b}".strip() for a, b in zip(rows[0], rows.pop(), strict=True)]
    return rows


def test_every_column_reads_whole_at_80_columns(phantom_site):
    """The guide's check of a CT + X-ray folder: at 80 columns a cell may wrap, never lose a
    letter: headers, status, shape and spacing read as the JSON says."""
    out = _check(str(phantom_site))
    assert out.returncode == 0, out.stderr
    assert all(len(line) <= 80 for line in out.stdout.splitlines())
    headers = _columns(out.stdout, "┃")
    assert headers == [["modality", "image", "files", "shape", "spacing (mm)", "status"]]
    body = _columns(out.stdout.split("Rejected")[0], "│")
    usable = json.loads(_check(str(phantom_site), "--json").stdout)["usable"]
    assert len(body) == len(usable) == 4
    for row, image in zip(body, usable, strict=True):
        assert row[0] == image["modality"] and row[2] == str(image["files"])
        assert row[3] == " x ".join(map(str, image["shape"])), row
        if image["spacing"] is None:
            assert row[4] == "unknown"
        else:  # 3 significant digits of the same numbers
            shown = [float(s) for s in row[4].split(" x ")]
            assert shown == pytest.approx(image["spacing"], rel=5e-3), row
        assert row[5] == "usable", row
        assert row[1].replace(" ", "").lstrip("…/") in image["name"].replace(" ", "")
