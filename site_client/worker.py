"""The site's warm worker: one long-lived process that runs every round's work.

Flower 1.39 runs each message in a fresh ``flwr-clientapp`` process (docs/flower.md), so without
this every round pays for a Python start, a torch import, a model build and a cache open. ``site
start`` therefore starts this worker next to the SuperNode; the ClientApp becomes a shim that
hands the round to it (:func:`call`) and returns its reply.

The channel is a Unix socket ``STATE/worker.sock`` in the site's 0700 state directory, the
socket itself 0600, and every connection must prove it knows the 32-byte key in
``STATE/worker.key`` (0600; :mod:`multiprocessing.connection`'s HMAC challenge). Only the site's
own user can reach it; nothing listens on the network.

Failure handling:

- the worker dies mid-round: the shim's connection ends at once (EOF), the shim replies with
  error :data:`~site_client.errors.ERROR_WORKER`, and the round fails for this site only;
- the supervisor (:class:`WorkerProcess`, polled by ``site start`` every 2 s) sees the exit
  and starts a new worker; the shim of the next message waits up to ``connect_timeout_s``
  for the socket to come back;
- the worker exits by itself when its parent (``site start``) is gone.

Run as ``python -m site_client.worker STATE_DIR``.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

from site_client.round_messages import RoundReply, RoundRequest

__all__ = ["SOCKET", "KEY", "WorkerUnavailable", "WorkerProcess", "call", "serve", "write_key"]

log = logging.getLogger(__name__)

SOCKET = "worker.sock"
KEY = "worker.key"
PID = "worker.pid"
LOG = "worker.log"  # under STATE/logs/


class WorkerUnavailable(RuntimeError):
    """The worker could not be reached, or went away before it replied."""


def write_key(state: Path) -> bytes:
    """A fresh random key for this worker, readable only by the site's user."""
    key = secrets.token_bytes(32)
    path = state / KEY
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.chmod(path, 0o600)
    return key


def call(socket_path: str | Path, request: RoundRequest, connect_timeout_s: float = 60.0
         ) -> RoundReply:
    """Hand ``request`` to the worker and wait for its reply.

    Waits up to ``connect_timeout_s`` for a worker that is (re)starting. Raises
    :class:`WorkerUnavailable` when none answers, or when the worker dies before replying.
    """
    socket_path = Path(socket_path)
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            key = (socket_path.parent / KEY).read_bytes()
            conn = Client(str(socket_path), family="AF_UNIX", authkey=key)
            break
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, EOFError) as e:
            if time.monotonic() >= deadline:
                raise WorkerUnavailable(f"no worker at {socket_path} ({e})") from e
            time.sleep(0.2)
    with conn:
        try:
            conn.send(request)
            reply = conn.recv()
        except (EOFError, OSError) as e:
            raise WorkerUnavailable("the worker went away during the round") from e
    if not isinstance(reply, RoundReply):
        raise WorkerUnavailable("the worker answered something that is not a reply")
    return reply


def _exit_with_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            log.warning("site start is gone; worker exiting")
            os._exit(0)
        time.sleep(1.0)


def serve(state: Path) -> None:
    """Listen on ``state/worker.sock`` and run one request at a time until killed."""
    from site_client import round_work  # the warm part: torch, the models, the trainer

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    key = (state / KEY).read_bytes()
    sock = state / SOCKET
    sock.unlink(missing_ok=True)
    old = os.umask(0o077)
    try:
        listener = Listener(str(sock), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old)
    os.chmod(sock, 0o600)
    log.info("worker %d ready on %s", os.getpid(), sock)
    while True:
        try:
            conn = listener.accept()  # the HMAC challenge: a wrong key never gets a request in
        except Exception as e:  # noqa: BLE001 - a failed handshake must not end the worker
            log.warning("refused a connection: %s", type(e).__name__)
            continue
        with conn:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                continue
            if not isinstance(request, RoundRequest):
                continue
            t0 = time.perf_counter()
            log.info("%s request (round work) started", request.kind)
            reply = round_work.handle(request)
            log.info("%s request done in %.2f s", request.kind, time.perf_counter() - t0)
            try:
                conn.send(reply)
            except OSError:
                log.warning("the ClientApp went away before the reply was sent")


class WorkerProcess:
    """The supervisor's handle on the worker: start it, restart it when it dies, stop it."""

    def __init__(self, state: Path, env: dict[str, str]):
        self.state = state
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def socket(self) -> Path:
        return self.state / SOCKET

    def start(self) -> None:
        write_key(self.state)
        (self.state / "logs").mkdir(exist_ok=True)
        with open(self.state / "logs" / LOG, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "site_client.worker", str(self.state)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                cwd=self.state)
        (self.state / PID).write_text(str(self.proc.pid))

    def check(self) -> bool:
        """Restart a worker that has exited; True if it had to."""
        if self.proc is None or self.proc.poll() is None:
            return False
        log.warning("site worker exited with code %s; starting a new one (the round it was "
                    "running fails for this site)", self.proc.returncode)
        self.restarts += 1
        self.start()
        return True

    def stop(self) -> None:
        from fed_unimiss.processes import terminate_pids

        if self.proc is not None:
            terminate_pids([self.proc.pid], grace_s=5.0)
            self.proc = None
        (self.state / PID).unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m site_client.worker STATE_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    serve(Path(argv[0]).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
