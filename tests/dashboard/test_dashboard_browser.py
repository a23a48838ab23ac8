"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

Playwright's own browser downloads are never used (``executable_path`` points at the system
chromium, which ``make test`` installs with apt where it can). Where no chromium exists the
tests skip and say so. Screenshots go to ``test-artifacts/dashboard/`` (or
``$FED_UNIMISS_TEST_ARTIFACTS``); with ``FED_UNIMISS_DOCS_SCREENSHOT=1`` the finished run's
screenshot is also written to docs/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dash_helpers import REPO, federation_config, serving, simulate_command, simulate_env

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("FED_UNIMISS_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
PLOTS = ("plot-loss", "plot-entropy", "plot-bytes", "plot-duration")


def _chromium() -> str:
    for candidate in (os.environ.get("FED_UNIMISS_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no chromium binary (looked for $FED_UNIMISS_CHROMIUM, /usr/bin/chromium and "
                "chromium on PATH): install Debian's package with `apt-get install chromium` "
                "(`make test` does so where apt is usable)")


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    """A fresh headless chromium page (new profile in tmp_path); fails on any page error."""
    binary = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    errors: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=binary, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 1000})
        try:
            pg = context.new_page()
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.set_default_timeout(60_000)
            yield pg
        finally:
            context.close()
    assert errors == [], errors


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_page_of_a_real_run_shows_state_sites_round_count_and_every_plot(page, finished_run):
    with serving(finished_run.out) as server:
        page.goto(server.url())
        page.wait_for_selector("#state.finished")
        for plot in PLOTS:
            page.wait_for_selector(f"#{plot}[data-state=rendered] canvas")
        assert page.inner_text("#round-of") == "3 of 3"
        assert page.inner_text("#eta") == "done"
        rows = page.locator("#sites tbody tr")
        assert [rows.nth(i).get_attribute("data-site") for i in range(rows.count())] == \
            ["A", "B", "C"]
        a = page.inner_text("#sites tbody tr[data-site=A]")
        assert "privacy budget exhausted" in a and "/ 8.00" in a
        assert "no DP" in page.inner_text("#sites tbody tr[data-site=B]")
        for plot in PLOTS:
            assert page.get_attribute(f"#{plot}", "data-rounds") == "3"
        loss_legend = page.inner_text("#plot-loss")
        assert "global train" in loss_legend and "B" in loss_legend and "C" in loss_legend
        path = _shot(page, "finished-run")
    assert path.stat().st_size > 10_000
    if os.environ.get("FED_UNIMISS_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(path, REPO / "docs" / "dashboard.png")


def test_new_rounds_appear_without_a_reload(page, sites, tmp_path):
    out = tmp_path / "run"
    cmd = simulate_command(federation_config(tmp_path), {"B": sites["B"], "C": sites["C"]}, 3,
                           out)
    with serving(out, refresh_s=0.3) as server:
        page.goto(server.url())
        page.wait_for_selector("#state.waiting")
        page.evaluate("window.__loadedOnce = true")  # gone if the page reloads
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=simulate_env())
        try:
            page.wait_for_selector("body[data-rounds='1']", timeout=300_000)
            _shot(page, "live-round-1")
            page.wait_for_selector("body[data-rounds='3']", timeout=300_000)
            page.wait_for_selector("#state.finished", timeout=60_000)
            assert proc.wait(timeout=120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert page.evaluate("window.__loadedOnce") is True
        assert page.inner_text("#round-of") == "3 of 3"
        assert page.get_attribute("#plot-loss", "data-rounds") == "3"
        _shot(page, "live-finished")


def test_browser_without_the_token_gets_401_on_a_non_loopback_bind(page, finished_run):
    with serving(finished_run.out, "0.0.0.0:0") as server:
        token = server.cfg.token
        assert token
        bare = server.url(with_token=False)
        response = page.goto(bare)
        assert response.status == 401 and "token" in page.inner_text("body")
        _shot(page, "no-token-401")
        response = page.goto(server.url())
        assert response.status == 200
        page.wait_for_selector("#state.finished")
        page.wait_for_selector("#plot-loss[data-state=rendered] canvas")
        assert "token=" not in page.url  # dropped from the address bar; a cookie carries it
        assert page.reload().status == 200
        api = page.evaluate("fetch('api/sites').then(r => r.status)")
        assert api == 200
        page.context.clear_cookies()
        assert page.evaluate("fetch('api/sites').then(r => r.status)") == 401


def test_the_guides_screenshot_command_captures_the_run_not_loading(finished_run, tmp_path):
    """docs/coordinator-guide.md's one-line screenshot, with no --virtual-time-budget: the page
    arrives with its data and draws it before the load event, where headless chromium shoots."""
    binary = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    with serving(finished_run.out, refresh_s=3.0) as server:
        dom = subprocess.run([binary, *flags, "--dump-dom", server.url()], capture_output=True,
                             text=True, timeout=180)
        shot = tmp_path / "dashboard.png"
        taken = subprocess.run([binary, *flags, f"--screenshot={shot}", server.url()],
                               capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="state" class="badge finished"' in dom.stdout, dom.stdout[:3000]
    assert 'data-rounds="3"' in dom.stdout and "no round has completed yet" not in dom.stdout
    assert 'id="round-of">3 of 3<' in dom.stdout
    for plot in PLOTS:
        assert f'id="{plot}"' in dom.stdout
    assert dom.stdout.count('data-state="rendered"') == len(PLOTS)
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "guide-screenshot.png")


def test_page_shows_who_is_online_among_the_registered_sites(page, finished_run, tmp_path):
    """What `aggregator start` records from the SuperLink (here: D registered, never in a round;
    B online now), written as it writes it, with this process as the live writer."""
    import json
    import socket

    out = tmp_path / "run"
    shutil.copytree(finished_run.out, out, ignore=shutil.ignore_patterns("*.safetensors", "sites"))
    (out / "sites-online.json").write_text(json.dumps(
        {"at": 1.0, "registered": ["A", "B", "C", "D"], "online": ["B"], "pid": os.getpid(),
         "pid_started": None, "host": socket.gethostname()}))
    with serving(out) as server:
        page.goto(server.url())
        page.wait_for_selector("#state.finished")
        assert page.inner_text("#online") == "online now: 1 of 4 registered (B)"
        rows = page.locator("#sites tbody tr")
        assert [rows.nth(i).get_attribute("data-site") for i in range(rows.count())] == \
            ["A", "B", "C", "D"]
        assert page.inner_text("#sites tbody tr[data-site=B] td.now") == "online"
        assert page.inner_text("#sites tbody tr[data-site=D] td.now") == "offline"
        assert page.is_visible("#sites th.now")
        _shot(page, "online-sites")
