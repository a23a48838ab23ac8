"""How a site waits for its coordinator: when to try again, what to tell the operator, and
when a site that never got through gives up.

A site outlives the coordinator's runs. Once it has been connected, a coordinator that goes
away (its run ended, it restarted, the network dropped) is waited for until the site is
stopped: hospital IT starts the site once, and it takes part in every run after. Before the
first connection, ``connect_timeout_s`` (site.yaml; 0 = until stopped) bounds the wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["CoordinatorWait", "RETRY_FIRST_S", "RETRY_MAX_S"]

RETRY_FIRST_S = 2.0
# The slowest retry: one TCP connection and TLS handshake this often costs nothing, and a
# resumed run (which waits 120 s for its sites) still finds the site in time.
RETRY_MAX_S = 30.0
REPEAT_S = 600.0  # an unchanged reason is said again at most this often


class CoordinatorWait:
    """Backoff from ``RETRY_FIRST_S`` doubling up to ``RETRY_MAX_S``, reset by a connection."""

    def __init__(self, site: str, superlink: str, give_up_after_s: float,
                 say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.site, self.superlink = site, superlink
        self.give_up_after_s = give_up_after_s
        self.say, self.clock = say, clock
        self.started = clock()
        self.ever_connected = False
        self._delay = RETRY_FIRST_S
        self._last: tuple[str, float] | None = None

    def connected(self) -> None:
        self.ever_connected = True
        self._delay = RETRY_FIRST_S
        self._last = None

    def coordinator_gone(self) -> None:
        self._delay = RETRY_FIRST_S
        self.say(f"site {self.site}: the coordinator at {self.superlink} has gone: its run "
                 "ended, or it stopped or restarted. Waiting for the next run (until this "
                 "site is stopped)")

    def expired(self) -> bool:
        """True once a site that never connected has tried for ``give_up_after_s``."""
        return (not self.ever_connected and self.give_up_after_s > 0
                and self.clock() - self.started >= self.give_up_after_s)

    def next_delay(self, cause: str) -> float:
        """Seconds to sleep before the next try; says why (once per reason and ten minutes)."""
        now, delay = self.clock(), self._delay
        if not self.ever_connected and self.give_up_after_s > 0:
            delay = min(delay, max(0.0, self.started + self.give_up_after_s - now))
        if self._last is None or self._last[0] != cause or now - self._last[1] >= REPEAT_S:
            later = "" if math.isclose(delay, RETRY_MAX_S) else \
                f", then less often, up to every {RETRY_MAX_S:.0f} s"
            self.say(f"site {self.site}: cannot reach the coordinator at {self.superlink} "
                     f"({cause}); trying again in {delay:.0f} s{later}")
            self._last = (cause, now)
        self._delay = min(RETRY_MAX_S, self._delay * 2)
        return delay
