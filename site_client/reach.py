"""Can this site reach its coordinator? A DNS lookup and one TLS handshake, in seconds.

Flower's SuperNode reports a name that does not resolve only after its whole wait
(``--max-wait-time``), and it treats a coordinator that is merely not up yet the same way as an
address that can never work. This probe tells the two apart before the SuperNode is started:

- certain, the operator has to act: the name does not exist in DNS, or the server's certificate
  is not signed by the kit's CA or does not cover the name the site dials;
- not certain, waiting may help: connection refused, no answer, a temporary DNS failure, a
  handshake cut short (the coordinator is restarting, or its run is over and the next one has
  not started).

The handshake uses the standard library's TLS with the kit's CA and the dialled host as server
name, as gRPC checks it; it sends nothing but the handshake and closes.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Reach", "probe_coordinator", "split_address"]

PROBE_TIMEOUT_S = 5.0
# OpenSSL's verify codes for a certificate whose names do not include the dialled host or IP,
# and for one that no certificate in the kit's CA file signed.
_NAME_MISMATCH = {62, 64}
_FOREIGN_ISSUER = {18, 19, 20, 21}
# getaddrinfo's answers that say the name does not exist (not "try again later").
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


@dataclass(frozen=True)
class Reach:
    """The probe's answer. ``kind`` is one of:

    - ``ok``: resolved and a TLS handshake with the kit's CA completed;
    - ``no-such-name``, ``name-mismatch``, ``foreign-ca``, ``untrusted`` (expired, ...):
      certain, the operator has to act;
    - ``waiting``: not reachable now (``detail`` says why); retrying may help.
    """

    kind: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @property
    def certain(self) -> bool:
        return self.kind not in ("ok", "waiting")


def split_address(superlink: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port)."""
    host, _, port = superlink.rpartition(":")
    return host.strip("[]"), int(port)


def probe_coordinator(superlink: str, ca: Path, timeout_s: float = PROBE_TIMEOUT_S) -> Reach:
    """Resolve the coordinator's name and complete a TLS handshake with it against ``ca``."""
    host, port = split_address(superlink)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in _NO_SUCH_NAME:
            return Reach("no-such-name", e.strerror)
        return Reach("waiting", f"the name {host!r} could not be looked up now ({e.strerror})")
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return Reach("waiting", "connection refused: nothing listens at that address")
    except TimeoutError:
        return Reach("waiting", f"no answer in {timeout_s:g} s (a firewall may drop the packets)")
    except OSError as e:
        return Reach("waiting", e.strerror or str(e))
    return _handshake(raw, host, ca)


def _handshake(raw: socket.socket, host: str, ca: Path) -> Reach:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])  # what gRPC offers; the server expects HTTP/2
    try:
        with context.wrap_socket(raw, server_hostname=host):
            return Reach("ok")
    except ssl.SSLCertVerificationError as e:
        if e.verify_code in _NAME_MISMATCH:
            return Reach("name-mismatch", e.verify_message)
        if e.verify_code in _FOREIGN_ISSUER:
            return Reach("foreign-ca", e.verify_message)
        return Reach("untrusted", e.verify_message)
    except ssl.SSLError as e:
        return Reach("waiting", f"the TLS handshake failed ({e.reason or e})")
    except OSError as e:  # reset or closed mid-handshake: a server going down
        return Reach("waiting", f"the connection was cut during the TLS handshake "
                                f"({e.strerror or e})")
    finally:
        raw.close()
