"""The site's warm worker on its own: the local channel, a crash, the restart (no Flower)."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from multiprocessing.connection import Client

import pytest

from fed_unimiss import exchange as ex
from site_client.errors import ERROR_TRAIN
from site_client.round_messages import RoundReply, RoundRequest
from site_client.worker import KEY, SOCKET, WorkerProcess, WorkerUnavailable, call


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def worker(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = WorkerProcess(state, env)
    proc.start()
    _wait(lambda: (state / SOCKET).exists(), 120)
    yield proc
    proc.stop()


def _request(tmp_path, kind: str = ex.TRAIN) -> RoundRequest:
    # No recipe in the config: the worker's round work fails and says so with a fixed text.
    return RoundRequest(kind, 1, 1, {ex.NODE_DATA_PATH: str(tmp_path),
                                     ex.NODE_STATE_DIR: str(tmp_path / "site")}, {}, {})


def test_channel_is_private_to_the_site_user(worker):
    sock, key = worker.state / SOCKET, worker.state / KEY
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    from multiprocessing import AuthenticationError

    with pytest.raises((AuthenticationError, EOFError, ConnectionResetError)):
        Client(str(sock), family="AF_UNIX", authkey=b"not the key").send("hello")
    assert worker.proc.poll() is None  # a wrong key does not end the worker


def test_worker_answers_and_keeps_serving(worker, tmp_path):
    for _ in range(2):
        reply = call(worker.socket, _request(tmp_path))
        assert isinstance(reply, RoundReply)
        assert reply.error == (ERROR_TRAIN, "site could not train this round; see the site log")
    assert worker.restarts == 0 and worker.proc.poll() is None


def test_a_killed_worker_fails_the_call_at_once_and_is_restarted(worker, tmp_path):
    first = worker.proc.pid
    os.kill(first, signal.SIGKILL)
    worker.proc.wait(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(WorkerUnavailable):
        call(worker.socket, _request(tmp_path), connect_timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    assert worker.check() and worker.restarts == 1 and worker.proc.pid != first
    reply = call(worker.socket, _request(tmp_path), connect_timeout_s=120)
    assert reply.error is not None and reply.error[0] == ERROR_TRAIN
