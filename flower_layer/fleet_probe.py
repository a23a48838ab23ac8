"""Ask the coordinator's Fleet API whether a site's key is registered, without joining a run.

Flower 1.39 answers "is this key registered?" only to a SuperNode activating itself: the
SuperLink activates a registered key that is offline (the node shows online and the call returns
its node id) and refuses anything else with code 2004 ("Failed to activate SuperNode."): no node
has this key, or its node is online already (a SuperNode with this key is connected now). The
public error does not say which (measured: the reason stays in the SuperLink's log). The probe
makes that one call, signed with the site's key as the SuperNode signs it, and when it did
activate the node it deactivates it at once. It never pulls a message, so it never takes part in
a round; for the moment between the two calls the coordinator sees the site online. The caller
tells "online" from "not registered" by knowing whether this site is running.

Every Fleet call carries a signed timestamp that the SuperLink refuses ("Invalid timestamp") when
it is more than ``SYSTEM_TIME_TOLERANCE`` s ahead of its clock or ``TIMESTAMP_TOLERANCE +
SYSTEM_TIME_TOLERANCE`` s behind it: such a refusal is this machine's clock, and the probe says so.

This is the only module that speaks the Fleet API itself (docs/flower.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.client.grpc_rere_client.node_auth_client_interceptor import NodeAuthClientInterceptor
from flwr.common.constant import (
    HEARTBEAT_DEFAULT_INTERVAL,
    SYSTEM_TIME_TOLERANCE,
    TIMESTAMP_TOLERANCE,
)
from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
    ActivateNodeRequest,
    DeactivateNodeRequest,
)
from flwr.proto.fleet_pb2_grpc import FleetStub
from flwr.supercore.interceptors import RuntimeVersionClientInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

__all__ = ["FleetAnswer", "probe_registration", "CLOCK_AHEAD_S", "CLOCK_BEHIND_S"]

CLOCK_AHEAD_S = SYSTEM_TIME_TOLERANCE  # a signed timestamp may be this far ahead of the SuperLink
CLOCK_BEHIND_S = TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE  # ...or this far behind it


@dataclass(frozen=True)
class FleetAnswer:
    """What the Fleet API said. ``kind`` is one of:

    - ``registered``: the key is registered (the node was offline; activated and deactivated);
    - ``not-activated``: code 2004: the key is not registered, or its node is online right now
      (left as it was);
    - ``clock``: the signed timestamp was refused: this machine's clock is off;
    - ``unreachable``: no answer (``detail`` says why);
    - ``refused``: any other refusal (``detail`` is the SuperLink's text).
    """

    kind: str
    detail: str = ""
    node_id: int | None = None


def _channel(address: str, root_certificates: bytes, key: ec.EllipticCurvePrivateKey
             ) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    channel = grpc.secure_channel(address, credentials)
    return grpc.intercept_channel(
        channel, RuntimeVersionClientInterceptor(component_name="SuperNode"),
        NodeAuthClientInterceptor(key, key.public_key()))


def probe_registration(address: str, root_certificates: bytes, key: ec.EllipticCurvePrivateKey,
                       timeout_s: float = 10.0) -> FleetAnswer:
    """Whether ``key`` is registered at the Fleet API at ``address`` (``HOST:PORT``, TLS with
    ``root_certificates``); see the module docstring for what the call does."""
    channel = _channel(address, root_certificates, key)
    stub = FleetStub(channel)
    try:
        try:
            res = stub.ActivateNode(
                ActivateNodeRequest(public_key=public_key_to_bytes(key.public_key()),
                                    heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL),
                timeout=timeout_s)
        except grpc.RpcError as e:
            return _refusal(e)
        try:
            stub.DeactivateNode(DeactivateNodeRequest(node_id=res.node_id), timeout=timeout_s)
        except grpc.RpcError:
            pass  # it goes offline by itself when its missing heartbeats run out
        return FleetAnswer("registered", node_id=int(res.node_id))
    finally:
        channel.close()


def _refusal(error: grpc.RpcError) -> FleetAnswer:
    code = error.code()  # type: ignore[attr-defined]
    text = str(error.details() or "")  # type: ignore[attr-defined]
    if "Invalid timestamp" in text:
        return FleetAnswer("clock", text)
    if '"code": 2004' in text or "Failed to activate SuperNode" in text:
        return FleetAnswer("not-activated", text)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return FleetAnswer("unreachable", f"{code.name}: {text}")
    return FleetAnswer("refused", f"{code.name}: {text}")
