"""The quality report's paired intervals and their reading, on hand-computed examples."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "quality"))

from doc_markers import replace_section  # noqa: E402
from report import paired_difference  # noqa: E402
from report_real import markdown_real, reading  # noqa: E402
from seed_pairs import paired  # noqa: E402

T_975_2DF = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    a = {0: 0.5, 1: 0.6, 2: 0.9}
    b = {0: 0.4, 1: 0.4, 2: 0.6, 3: 0.1}  # seed 3 has no partner and is left out
    d = paired(a, b)
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width t * sd / sqrt(3)
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(0.2)
    assert d["ci95"] == pytest.approx(T_975_2DF * 0.1 / math.sqrt(3))
    assert reading(d) == "cannot be told apart: +0.200 [-0.048, +0.448]"


def test_pairing_is_by_seed_not_by_position():
    # Unpaired, the arms' spreads (0.1 .. 0.9) would swamp a constant +0.05 shift.
    a = {2: 0.95, 0: 0.15, 1: 0.55}
    b = {0: 0.10, 1: 0.50, 2: 0.90}
    d = paired(a, b)
    assert d["mean"] == pytest.approx(0.05) and d["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert reading(d).startswith("better by +0.050 [+0.050, +0.050]")
    assert reading(paired(b, a)).startswith("worse by -0.050")


def test_fewer_than_two_pairs_is_not_measured():
    assert paired({0: 0.5}, {0: 0.4, 1: 0.3}) is None
    assert paired({0: 0.5, 1: None}, {0: 0.4, 1: 0.3}) is None
    assert reading(None).startswith("not measured")


def test_phantom_rows_pair_by_seed_at_one_fraction():
    rows = [{"arm": arm, "fraction": f, "seed": s, "dice_mean": v}
            for arm, f, s, v in [("central", 0.1, 0, 0.5), ("central", 0.1, 1, 0.7),
                                 ("scratch", 0.1, 0, 0.4), ("scratch", 0.1, 1, 0.5),
                                 ("scratch", 1.0, 0, 0.0)]]
    d = paired_difference(rows, "central", "scratch", 0.1)
    assert d["mean"] == pytest.approx(0.15) and d["n"] == 2
    assert d["ci95"] == pytest.approx(12.706204736174707 * math.sqrt(0.005) / math.sqrt(2))


def test_real_section_compares_central_with_the_random_encoder_of_the_same_seed():
    probe = [{"arm": arm, "seed": s, "stage": st, "knn": v + st / 100, "linear": v}
             for arm, base in (("random", 0.5), ("central", 0.6), ("central_3d", 0.6),
                               ("federated", 0.6))
             for s, v in ((0, base), (1, base + 0.1), (2, base + 0.2)) for st in (3, 4)]
    rows = [{"arm": arm, "fraction": 1.0, "seed": s, "dice_mean": v, "train_items": 3}
            for arm, base in (("scratch", 0.3), ("central", 0.3), ("central_3d", 0.3),
                              ("federated", 0.3)) for s, v in ((0, base), (1, base + 0.05),
                                                                (2, base + 0.1))]
    results = {"settings": {"pretrain_steps": 20, "local_steps": 5, "pretrain_seeds": [0, 1, 2],
                            "epochs": 1, "steps_per_epoch": 10, "lr": 1e-3},
               "pretraining": {"central-p0": {"arm": "central", "pretrain_seconds": 1.0},
                               "federated-p0": {"arm": "federated", "pretrain_seconds": 2.0,
                                                "rounds": 2}},
               "sites": {"A": "ct", "B": "xray"}, "ct_spacing": [2.0, 3.0, 3.0],
               "patch": [8, 48, 48], "probe_rows": probe, "rows": rows, "wall_seconds": 60,
               "command": "run"}
    text = markdown_real(results)
    row = next(line for line in text.splitlines() if line.startswith("| probe stage 3 k-NN"))
    assert row.split(" | ")[1] == "better by +0.100 [+0.100, +0.100]"  # central - random
    assert "cannot be told apart: +0.000" in row.split(" | ")[2]  # central - central_3d
    dice = next(line for line in text.splitlines() if line.startswith("| Dice, 3 labelled"))
    assert dice.count("cannot be told apart: +0.000 [+0.000, +0.000]") == 3


def test_replace_section_keeps_the_prose_around_the_markers():
    text = "intro\n<!-- b -->\nold\n<!-- e -->\noutro\n"
    assert replace_section(text, "<!-- b -->", "<!-- e -->", "new") == (
        "intro\n<!-- b -->\nnew\n<!-- e -->\noutro\n")
    assert replace_section("intro\n", "<!-- b -->", "<!-- e -->", "new").endswith(
        "<!-- b -->\nnew\n<!-- e -->\n")
