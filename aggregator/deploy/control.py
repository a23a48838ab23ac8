"""Run control over the SuperLink's Control API, through the ``flwr`` CLI's own client code.

There is no public Python API for registering SuperNodes or starting runs in Flower 1.39; the
CLI's internals, reached through :mod:`flower_layer.control_api`, are what ``flwr run`` itself
uses (docs/flower.md, "Starting a run from Python"). Going through them, instead of shelling out
to ``flwr``, gives typed results: a run id, the run's final status, its byte counters. A zero exit of ``flwr run`` proves
nothing (a run that failed to install dependencies still exits 0), so callers check
:meth:`ControlClient.run_status` for ``finished:completed``.

``FLWR_HOME`` must point at a private folder (the RUN's) before this module talks to anything,
so that the CLI's credential store is not written to ``~/.flwr``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization

from flower_layer.control_api import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StopRunRequest,
    StreamLogsRequest,
    open_control_client,
    public_key_to_bytes,
    run_from_proto,
    start_run_request,
)

__all__ = ["ControlError", "InputError", "RunState", "ControlClient", "load_site_public_key"]

log = logging.getLogger(__name__)
# One line per poll at INFO would drown the progress output.
logging.getLogger("httpx").setLevel(logging.WARNING)


class ControlError(RuntimeError):
    """The SuperLink refused or could not be reached; the message says what to do."""


class InputError(ControlError):
    """The command's own input is wrong (config, --rounds, a resume that does not match RUN):
    refused before anything starts (``aggregator start`` exits 2)."""


@dataclass(frozen=True)
class RunState:
    """One run as the SuperLink sees it."""

    run_id: int
    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped | "" while not finished
    details: str
    bytes_sent: int
    bytes_recv: int

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def completed(self) -> bool:
        return self.status == "finished" and self.sub_status == "completed"

    def label(self) -> str:
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status


def load_site_public_key(path: str | Path) -> bytes:
    """The registration bytes of an OpenSSH EC public key file written by ``provision``."""
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as e:
        raise ControlError(f"{path}: cannot read site public key ({e.strerror})") from e
    except (ValueError, TypeError) as e:
        raise ControlError(f"{path}: not an OpenSSH public key ({e})") from e
    try:
        return public_key_to_bytes(key)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise ControlError(f"{path}: not an EC public key usable by Flower ({e})") from e


class ControlClient:
    """A TLS connection to one SuperLink's Control API."""

    def __init__(self, address: str, root_certificates: str | Path) -> None:
        self.address = address
        self._client = open_control_client("fed-unimiss", address, root_certificates)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Any, req: Any) -> Any:
        try:
            return fn(req)
        except click.ClickException as e:  # raised by the CLI's interceptors
            raise ControlError(f"SuperLink at {self.address}: {what} failed: {e.message}") from e
        except Exception as e:  # httpx transport errors, HTTP status errors
            raise ControlError(f"SuperLink at {self.address}: {what} failed: {e}") from e

    # ---------------------------------------------------------------- nodes

    def registered_keys(self) -> set[str]:
        """sha256 hex digests of the public keys already registered (for idempotent start-up)."""
        res = self._call("listing SuperNodes", self._client.ListNodes, ListNodesRequest())
        return {hashlib.sha256(n.public_key).hexdigest() for n in res.nodes_info}

    def online_sites(self) -> set[str]:
        """Names of the registered SuperNodes currently connected (status ``online``)."""
        res = self._call("listing SuperNodes", self._client.ListNodes, ListNodesRequest())
        return {n.name for n in res.nodes_info if n.status == "online"}

    def register_site(self, public_key: bytes, name: str) -> int | None:
        """Register one site's key; returns its node id, or None if it was registered before."""
        if hashlib.sha256(public_key).hexdigest() in self.registered_keys():
            return None
        res = self._call(
            f"registering site {name}", self._client.RegisterNode,
            RegisterNodeRequest(public_key=public_key, name=name),
        )
        if not res.node_id:
            raise ControlError(f"SuperLink at {self.address}: site {name} could not be registered")
        return int(res.node_id)

    # ---------------------------------------------------------------- runs

    def start_run(self, fab: bytes, overrides: dict[str, Any] | None = None) -> int:
        """Submit a run of ``fab`` with run-config ``overrides``; returns the run id."""
        pairs = [_config_pair(k, v) for k, v in (overrides or {}).items()]
        req = start_run_request(fab, pairs)
        res = self._call("starting the run", self._client.StartRun, req)
        if not res.HasField("run_id"):
            note = res.note if res.HasField("note") else "no reason given"
            raise ControlError(f"SuperLink at {self.address} did not start the run: {note}")
        return int(res.run_id)

    def run_status(self, run_id: int) -> RunState:
        res = self._call("reading run status", self._client.ListRuns,
                         ListRunsRequest(run_id=run_id))
        if run_id not in res.run_dict:
            raise ControlError(f"SuperLink at {self.address} does not know run {run_id}")
        run = run_from_proto(res.run_dict[run_id])
        return RunState(
            run_id=run_id, status=run.status.status, sub_status=run.status.sub_status,
            details=run.status.details, bytes_sent=int(run.bytes_sent),
            bytes_recv=int(run.bytes_recv),
        )

    def fetch_logs(self, run_id: int, after: float) -> tuple[str, float]:
        """ServerApp log output after timestamp ``after``: (text, newest timestamp).

        The ServerApp pushes its log to the SuperLink rather than to a stream we own; this
        reads the first batch of the Control API's log stream, like ``flwr log --show``.
        """
        req = StreamLogsRequest(run_id=run_id, after_timestamp=after)
        text, latest = "", after
        stream = self._call("reading the run's log", self._client.StreamLogs, req)
        try:
            for res in stream:
                text, latest = res.log_output, max(after, res.latest_timestamp)
                break
        except Exception as e:  # the stream ends with an error once the run is over
            log.debug("log stream of run %d ended: %s", run_id, e)
        finally:
            close = getattr(stream, "close", None)
            if callable(close):
                close()
        return text, latest

    def stop_run(self, run_id: int) -> bool:
        res = self._call(f"stopping run {run_id}", self._client.StopRun,
                         StopRunRequest(run_id=run_id))
        return bool(res.success)

    def wait_ready(self, timeout_s: float, alive: Any = None) -> None:
        """Block until the Control API answers, or raise after ``timeout_s``.

        ``alive`` (a callable returning False once the SuperLink process died) ends the wait
        early, so a SuperLink that failed to bind does not cost the whole timeout.
        """
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise ControlError(f"the SuperLink exited before its Control API at "
                                   f"{self.address} came up (see its log)")
            try:
                self._client.ListRuns(ListRunsRequest(limit=1))
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.3)
        raise ControlError(f"SuperLink Control API at {self.address} not ready after "
                           f"{timeout_s:.0f} s: {last}")


def _config_pair(key: str, value: Any) -> str:
    """One ``key=value`` override in the TOML-ish syntax ``parse_config_args`` expects."""
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"{key}={value}"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'{key}="{text}"'
