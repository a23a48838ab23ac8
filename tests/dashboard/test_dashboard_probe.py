"""The dashboard's probe plot in a real browser, from a RUN folder whose rounds carry a probe
(rows as the strategy writes them, aggregator/probe_report.py)."""

from __future__ import annotations

import json

import pytest
from dash_helpers import serving
from test_dashboard_browser import page  # noqa: F401 - the browser fixture

from aggregator.probe_report import probe_row, read_probe
from fed_unimiss import exchange as ex

pytestmark = pytest.mark.slow


def _row(round_num: int, knn: float) -> dict:
    sites = {name: read_probe({ex.probe_key(net, s, k): knn - 0.1 * (name == "B")
                               for net in ex.PROBE_NETWORKS for s in (1, 2, 3, 4)
                               for k in ex.PROBE_KINDS} | {ex.PROBE_ITEMS: items})
             for name, items in (("A", 3), ("B", 1))}
    return {"round": round_num, "sites": ["A", "B"], "loss": 10.0 - round_num, "seconds": 5.0,
            "per_site": {"A": {"loss": 9.0}, "B": {"loss": 8.0}}, "rejected": {},
            "probe": probe_row(sites, round_num)}


def test_probe_plot_shows_the_weighted_and_per_site_curves(page, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    rows = [_row(1, 0.5), _row(2, 0.6), _row(3, 0.7)]
    (out / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with serving(out) as server:
        page.goto(server.url())
        page.wait_for_selector("#plot-probe[data-state=rendered] canvas")
        assert page.get_attribute("#plot-probe", "data-rounds") == "3"
        legend = page.inner_text("#plot-probe")
        assert "teacher k-NN (weighted)" in legend and "student k-NN (weighted)" in legend
        assert "A teacher k-NN" in legend and "B teacher k-NN" in legend
