"""The dashboard's ASGI app (Starlette) and the uvicorn server that runs it.

Routes: ``/`` (the page, with the three API documents of that moment in a JSON block, so that
it shows the run at once), ``/static/...`` (its script, style and the vendored uPlot),
``/api/run``, ``/api/rounds``, ``/api/sites`` (JSON, see :mod:`aggregator.dashboard.data`).
Everything is read-only (GET/HEAD).

Token rule: bound to a loopback address (127.0.0.1, ::1, localhost) the server needs no token
unless one is given; bound to anything else (0.0.0.0 included) it needs one, and every request
without it gets 401, whichever interface it arrived on. The token is accepted as
``Authorization: Bearer TOKEN``, as ``?token=TOKEN`` (the link printed at start: the page then
gets an HttpOnly cookie so that its own requests carry it), or as that cookie.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from aggregator.dashboard.data import run_view

__all__ = ["DashboardConfig", "build_app", "parse_address", "is_loopback", "DashboardServer"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "fed_unimiss_dashboard"
DEFAULT_ADDRESS = "127.0.0.1:8050"
INITIAL_DATA = "<!--INITIAL-DATA-->"  # in index.html: where the page's first data goes


def page_html(cfg: DashboardConfig) -> str:
    """index.html with the run, rounds and sites of this moment in its JSON block.

    ``<`` is escaped in the JSON so that no value can close the block; the block is data, not
    a script, so the page's Content-Security-Policy (scripts from 'self' only) still holds.
    """
    view = run_view(cfg.out)
    data = {"run": {**view.run, "refresh_s": cfg.refresh_s}, "rounds": view.rounds,
            "sites": view.sites}
    text = json.dumps(data, allow_nan=False).replace("<", "\\u003c")
    return (STATIC / "index.html").read_text(encoding="utf-8").replace(INITIAL_DATA, text, 1)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ValueError names the problem."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--address {text!r}: expected HOST:PORT, e.g. {DEFAULT_ADDRESS} or "
                         "0.0.0.0:8050 (then a token is required)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class DashboardConfig:
    out: Path
    host: str = "127.0.0.1"
    port: int = 8050
    token: str | None = None  # required when set; generated for a non-loopback host
    refresh_s: float = 3.0  # how often the page asks for new rounds

    @classmethod
    def make(cls, out: str | Path, address: str = DEFAULT_ADDRESS, token: str | None = None,
             refresh_s: float = 3.0) -> DashboardConfig:
        host, port = parse_address(address)
        if token is None and not is_loopback(host):
            token = secrets.token_urlsafe(24)
        if token is not None and len(token) < 16:
            raise ValueError("--token: use at least 16 characters (or leave it out and "
                             "one is generated)")
        if not refresh_s > 0:
            raise ValueError(f"--refresh: must be a positive number of seconds, got {refresh_s}")
        return cls(Path(out), host, port, token, refresh_s)


class TokenGate:
    """ASGI middleware: 401 for every HTTP request that lacks the token (no route is exempt)."""

    def __init__(self, app: Any, token: str | None):
        self.app, self.token = app, token

    def _given(self, scope: dict[str, Any]) -> tuple[str | None, bool]:
        """(the token the request carries, whether it came in the query string)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0], True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header is the same as none
            return None, False
        return (cookie[COOKIE].value if COOKIE in cookie else None), False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":  # no route speaks it (and uvicorn runs with ws off)
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        given, in_query = self._given(scope)
        if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            response = Response("401 Unauthorized: this dashboard needs its token "
                                "(the link printed when it started)\n", status_code=401,
                                headers={"WWW-Authenticate": "Bearer"}, media_type="text/plain")
            await response(scope, receive, send)
            return
        if not in_query:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                value = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                message.setdefault("headers", []).append((b"set-cookie", value.encode()))
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def build_app(cfg: DashboardConfig) -> Any:
    """The dashboard as an ASGI app (Starlette behind the token gate)."""
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer",
               "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                          "style-src 'self' 'unsafe-inline'"}

    async def page(request: Request) -> Response:
        return HTMLResponse(await run_in_threadpool(page_html, cfg), headers=headers)

    # The RUN folder is read per request in a worker thread (a few small files).
    async def api_run(request: Request) -> Response:
        run = (await run_in_threadpool(run_view, cfg.out)).run
        run["refresh_s"] = cfg.refresh_s
        return JSONResponse(run, headers=headers)

    async def api_rounds(request: Request) -> Response:
        return JSONResponse((await run_in_threadpool(run_view, cfg.out)).rounds, headers=headers)

    async def api_sites(request: Request) -> Response:
        return JSONResponse((await run_in_threadpool(run_view, cfg.out)).sites, headers=headers)

    app = Starlette(routes=[
        Route("/", page),
        Route("/api/run", api_run),
        Route("/api/rounds", api_rounds),
        Route("/api/sites", api_sites),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
    return TokenGate(app, cfg.token)


class DashboardServer:
    """uvicorn serving :func:`build_app`, in the foreground (``run``) or a thread (``start``)."""

    def __init__(self, cfg: DashboardConfig):
        import uvicorn

        self.cfg = cfg
        self.server = uvicorn.Server(uvicorn.Config(
            build_app(cfg), host=cfg.host, port=cfg.port, log_level="warning",
            access_log=False, server_header=False, lifespan="off", ws="none"))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose when the config says 0)."""
        for server in getattr(self.server, "servers", []) or []:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.cfg.port

    def url(self, with_token: bool = True) -> str:
        """The address to open, with ``?token=`` when one is needed (as printed at start)."""
        host = self.cfg.host if self.cfg.host not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        query = f"/?token={quote(self.cfg.token, safe='')}" if with_token and self.cfg.token \
            else "/"
        return f"http://{host}:{self.port}{query}"

    def run(self) -> None:
        """Serve in the foreground until Ctrl-C (uvicorn handles the signal)."""
        self.server.run()

    def start(self, timeout: float = 30.0) -> None:
        """Serve from a daemon thread; returns once the socket listens (raises if it cannot)."""
        self._thread = threading.Thread(target=self.server.run, name="dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the dashboard could not listen on {self.cfg.host}:"
                              f"{self.cfg.port} (address in use?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
