"""The SuperLink's Control API through the ``flwr`` CLI's own client code.

Flower 1.39 has no public Python API for registering SuperNodes or starting runs; the CLI's
internals (``SuperLinkConnection`` + ``init_http_client_from_connection``, the Control API request
messages, the serde helpers) are what ``flwr run`` itself uses (docs/flower.md, "Starting a run
from Python"). This module is the only importer of them; aggregator/deploy/control.py builds its
typed client on what is exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path
from typing import Any

from flwr.cli.typing import SuperLinkConnection
from flwr.cli.utils import init_http_client_from_connection
from flwr.common.config import parse_config_args
from flwr.common.serde import fab_to_proto, run_from_proto, user_config_to_proto
from flwr.proto.control_pb2 import (  # pylint: disable=E0611
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    StreamLogsRequest,
)
from flwr.supercore.fab import Fab
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

__all__ = [
    "ListNodesRequest",
    "ListRunsRequest",
    "RegisterNodeRequest",
    "StartRunRequest",
    "StopRunRequest",
    "StreamLogsRequest",
    "open_control_client",
    "start_run_request",
    "run_from_proto",
    "public_key_to_bytes",
]


def open_control_client(name: str, address: str, root_certificates: str | Path) -> Any:
    """An HTTPS client of the Control API at ``address``, as the ``flwr`` CLI builds it.

    Its methods (``ListNodes``, ``RegisterNode``, ``StartRun``, ``ListRuns``, ``StreamLogs``,
    ``StopRun``) take the request messages exported here; errors raised by its interceptors are
    ``click.ClickException``.
    """
    conn = SuperLinkConnection(
        name=name, address=address, root_certificates=str(Path(root_certificates).resolve()),
    )
    # The CLI helper announces the connection on stdout; keep the caller's stdout for progress.
    with contextlib.redirect_stdout(io.StringIO()):
        return init_http_client_from_connection(conn)


def start_run_request(fab: bytes, override_pairs: list[str]) -> StartRunRequest:
    """A request to run ``fab`` with ``key=value`` run-config overrides (``flwr run -c`` syntax)."""
    return StartRunRequest(
        fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
        override_config=user_config_to_proto(parse_config_args(override_pairs or None)),
    )
