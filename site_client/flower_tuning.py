"""Flower 1.39's object-pull backoff, shortened in the processes that run our code.

A message can be pulled before all its array chunks have arrived; the reader then retries each
missing chunk after 1 s, 2 s, 4 s, ... up to 10 s (``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP``
in ``flwr/supercore/constant.py``, bound as keyword defaults of ``pull_objects`` and
``pull_and_inflate_object_from_tree``). On loopback that backoff, not the transfer, was most of
a round's coordination (issue 15, docs/benchmarks.md "Deployment"). Flower has no setting for
it, so the processes we own set the defaults of those two functions: retry after 0.05 s, at most
every 0.5 s, bounded by Flower's 7200 s ``PULL_MAX_TIME`` instead of 500 tries (500 tries of
0.5 s would give up on a slow link). The ClientApp shim does it for the ``flwr-clientapp``
process; the ServerApp does the same (aggregator/flower_private.py). Flower itself is not
changed; a Flower without these defaults is left as it is.
"""

from __future__ import annotations

__all__ = ["shorten_object_pull_backoff"]

INITIAL_BACKOFF_S = 0.05
BACKOFF_CAP_S = 0.5


def shorten_object_pull_backoff(initial_s: float = INITIAL_BACKOFF_S,
                                cap_s: float = BACKOFF_CAP_S) -> bool:
    """Set the retry defaults of Flower's object pulls in this process; False if not found."""
    try:
        from flwr.supercore.inflatable import inflatable_utils as utils
    except ImportError:
        return False
    done = False
    for fn in (getattr(utils, "pull_objects", None),
               getattr(utils, "pull_and_inflate_object_from_tree", None)):
        defaults = getattr(fn, "__kwdefaults__", None)
        if defaults and {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(defaults):
            defaults.update(initial_backoff=initial_s, backoff_cap=cap_s,
                            max_tries_per_object=None)
            done = True
    return done
