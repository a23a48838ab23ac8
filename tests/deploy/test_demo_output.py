"""The demo's closing table and plot, from rounds.jsonl rows (the real demo run is benchmarked,
docs/benchmarks.md "The demo"; tests/deploy/test_deploy_e2e.py runs the same deployment)."""

from __future__ import annotations

from aggregator.cli import format_round, kind_losses
from aggregator.demo import loss_table, round_times, site_kind_losses, write_plot


def _rows() -> list[dict]:
    per = [{"A": {"loss_3d": 21.7, "samples_3d": 160, "seconds": 45.5},
            "B": {"loss_2d": 4.05, "samples_2d": 640, "seconds": 20.0},
            "C": {"loss_2d": 6.56, "loss_3d": 21.4, "samples_2d": 960, "samples_3d": 80,
                  "seconds": 30.0}},
           {"A": {"loss_3d": 15.0, "samples_3d": 160, "seconds": 52.5},
            "B": {"loss_2d": 3.55, "samples_2d": 640, "seconds": 21.0},
            "C": {"loss_2d": 4.50, "loss_3d": 15.1, "samples_2d": 960, "samples_3d": 80,
                  "seconds": 31.0}}]
    seconds = (70.9, 80.3)
    return [{"round": i + 1, "sites": ["A", "B", "C"], "loss": 10.0, "seconds": seconds[i],
             "per_site": p, "rejected": {}} for i, p in enumerate(per)]


def test_loss_table_has_a_column_per_site_and_kind_and_the_change():
    text = loss_table(_rows())
    header = next(line for line in text.splitlines() if line.lstrip().startswith("round"))
    assert header.split()[1:] == ["A", "3D", "B", "2D", "C", "2D", "C", "3D"]
    change = next(line for line in text.splitlines() if line.startswith("change"))
    assert change.split()[1:] == ["-31%", "-12%", "-31%", "-29%"]
    assert site_kind_losses(_rows())["C 2D"] == {1: 6.56, 2: 4.50}


def test_round_time_splits_training_from_coordination():
    (r1, t1, c1), _ = round_times(_rows())
    assert (r1, t1) == (1, 45.5)  # the slowest site: sites train in parallel
    assert abs(c1 - (70.9 - 45.5)) < 1e-9


def test_round_line_shows_kinds_apart_and_names_refused_sites():
    row = {**_rows()[0], "sites": ["B", "C"],
           "rejected": {"A": "refused: the site's DP settings cannot train this federation's "
                             "recipe (code 5104)"}}
    line = format_round(row, 2)
    assert "(2D " in line and ", 3D " in line
    assert line.endswith("not used: A (refused: the site's DP settings cannot train this "
                         "federation's recipe (code 5104))")
    assert kind_losses(row)["2d"] == (4.05 * 640 + 6.56 * 960) / 1600


def test_plot_is_a_png(tmp_path):
    path = write_plot(_rows(), tmp_path / "demo.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_plot([], tmp_path / "none.png") is None


def _probed_rows() -> list[dict]:
    from aggregator.probe_report import probe_row, read_probe
    from fed_unimiss import exchange as ex

    rows = _rows()
    for row, (knn, linear) in zip(rows, ((0.41, 0.30), (0.58, 0.47)), strict=True):
        site = read_probe({ex.probe_key("teacher", 3, "knn"): 0.2,
                           ex.probe_key("teacher", 4, "knn"): knn,
                           ex.probe_key("teacher", 4, "linear"): linear,
                           ex.probe_key("student", 4, "knn"): knn - 0.01, ex.PROBE_ITEMS: 2})
        row["probe"] = probe_row({"A": site}, row["round"])
    return rows


def test_probe_table_shows_the_teachers_two_deepest_stages_per_round_trained(tmp_path):
    from aggregator.demo import probe_curves, probe_table

    curves = probe_curves(_probed_rows())
    assert curves["knn stage4"] == {0: 0.41, 1: 0.58}  # round r probes after r - 1 rounds
    assert curves["linear stage4"] == {0: 0.30, 1: 0.47}
    assert curves["knn stage3"] == {0: 0.2, 1: 0.2}
    assert set(curves) == {"knn stage4", "linear stage4", "knn stage3"}  # the teacher only
    lines = probe_table(_probed_rows()).splitlines()
    assert lines[1].split() == ["after", "rounds", "knn", "stage4", "linear", "stage4", "knn",
                                "stage3"]
    assert lines[3].split() == ["1", "0.580", "0.470", "0.200"]
    assert probe_table(_rows()) == "probe: no site reported one"


def test_the_final_models_probe_is_a_row_of_its_own():
    """The demo probes the last checkpoint itself (no round probes the model after the last
    round): that row extends the curve and the table says who probed it."""
    from aggregator.demo import probe_curves, probe_table
    from aggregator.probe_report import probe_row, read_probe
    from fed_unimiss import exchange as ex

    rows = _probed_rows()
    final = read_probe({ex.probe_key("teacher", 4, "knn"): 0.66,
                        ex.probe_key("teacher", 4, "linear"): 0.52, ex.PROBE_ITEMS: 4})
    rows.append({"round": 3, "final_probe": True, "probe": probe_row({"A": final}, 3)})
    assert probe_curves(rows)["knn stage4"] == {0: 0.41, 1: 0.58, 2: 0.66}
    text = probe_table(rows)
    assert text.splitlines()[4].split()[:3] == ["2", "0.660", "0.520"]
    assert "after 2 rounds: the final model, probed by the demo" in text
    assert loss_table(rows[:2]) == loss_table(_rows())  # the probe-only row is not a round
