"""The token rule, against the real server: off loopback every request needs the token.

Bound to 0.0.0.0 (any non-loopback address), a request without the token, or with a wrong one,
gets 401 on every route, the page, the API, the static files and unknown paths alike, even
when it arrives over 127.0.0.1. The token works as a Bearer header, as ``?token=`` (which sets
an HttpOnly cookie for the page's own requests) and as that cookie.
"""

from __future__ import annotations

import re
import select
import socket
import subprocess
import time

import pytest
from dash_helpers import FED_UNIMISS, http_get, serving

from aggregator.dashboard.server import COOKIE, DashboardConfig

ROUTES = ("/", "/api/run", "/api/rounds", "/api/sites", "/static/dashboard.js",
          "/static/vendor/uPlot.iife.min.js", "/static/vendor/uPlot.LICENSE", "/no-such-page")
TOKEN = "t0ken-for-the-dashboard-test"


def _non_loopback_ip() -> str | None:
    """An IPv4 address of this machine's interfaces other than loopback, if it has one."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_non_loopback_bind_answers_401_to_every_request_without_the_token(tmp_path):
    with serving(tmp_path, "0.0.0.0:0", token=TOKEN) as server:
        hosts = ["127.0.0.1"] + ([ip] if (ip := _non_loopback_ip()) else [])
        for host in hosts:
            base = f"http://{host}:{server.port}"
            for route in ROUTES:
                for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"},
                                {"Cookie": f"{COOKIE}=wrong-token-wrong-token"},
                                {"Authorization": f"Basic {TOKEN}"}):
                    status, _, body = http_get(base + route, headers)
                    assert status == 401, (host, route, headers, status)
                    assert b"token" in body
                sep = "&" if "?" in route else "?"
                status, _, _ = http_get(f"{base}{route}{sep}token=wrong-token-wrong-token")
                assert status == 401, (host, route)
        base = f"http://127.0.0.1:{server.port}"
        expected = {route: 404 if route == "/no-such-page" else 200 for route in ROUTES}
        for route in ROUTES:
            assert http_get(base + route, {"Authorization": f"Bearer {TOKEN}"})[0] \
                == expected[route], route
            assert http_get(base + route, {"Cookie": f"{COOKIE}={TOKEN}"})[0] == expected[route]
        status, headers, _ = http_get(f"{base}/?token={TOKEN}")
        assert status == 200
        assert f"{COOKIE}={TOKEN}" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]


def test_loopback_bind_needs_no_token_unless_one_is_given(tmp_path):
    with serving(tmp_path) as server:
        assert server.cfg.token is None
        for route in ROUTES[:-1]:
            assert http_get(f"http://127.0.0.1:{server.port}{route}")[0] == 200, route
    with serving(tmp_path, token=TOKEN) as server:
        assert http_get(f"http://127.0.0.1:{server.port}/api/run")[0] == 401
        assert http_get(f"http://127.0.0.1:{server.port}/api/run",
                        {"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_configuration_errors_name_the_flag(tmp_path):
    generated = DashboardConfig.make(tmp_path, "0.0.0.0:8050")
    assert generated.token is not None and len(generated.token) >= 16
    assert DashboardConfig.make(tmp_path, "10.1.2.3:8050").token is not None
    assert DashboardConfig.make(tmp_path, "127.0.0.1:8050").token is None
    assert DashboardConfig.make(tmp_path, "[::1]:8050").token is None
    with pytest.raises(ValueError, match="--token"):
        DashboardConfig.make(tmp_path, "0.0.0.0:8050", token="short")
    for bad in ("8050", "localhost", "127.0.0.1:http", "127.0.0.1:70000", ":8050"):
        with pytest.raises(ValueError, match="--address"):
            DashboardConfig.make(tmp_path, bad)
    with pytest.raises(ValueError, match="--refresh"):
        DashboardConfig.make(tmp_path, refresh_s=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_prints_a_generated_token_that_opens_the_page(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([str(FED_UNIMISS), "aggregator", "dashboard", "--out", str(tmp_path),
                             "--address", f"0.0.0.0:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed, deadline = "", time.monotonic() + 120
        while "token=" not in printed and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
                if not line:
                    break
                printed += line
        match = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", printed)
        assert match, printed
        base, token = match.groups()
        assert http_get(f"{base}/api/run")[0] == 401
        status, _, body = http_get(f"{base}/?token={token}")
        assert status == 200 and b"fed-unimiss" in body
        assert http_get(f"{base}/api/run", {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
