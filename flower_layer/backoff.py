"""Flower 1.39's object-pull backoff, shortened in the processes that run our code.

A message can be pulled before all its array chunks have arrived; the reader then retries each
missing chunk after 1 s, 2 s, 4 s, ... up to 10 s (``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP``
in ``flwr/supercore/constant.py``, bound as keyword defaults of ``pull_objects`` and
``pull_and_inflate_object_from_tree``). On loopback that backoff, not the transfer, was most of a
deployed round's coordination, about 7 s a round (docs/benchmarks.md, "Deployment"). Flower has
no setting for it, so the processes we own set the defaults of those two functions: retry after
0.05 s, at most every 0.5 s, bounded by Flower's 7200 s ``PULL_MAX_TIME`` instead of 500 tries
(500 tries of 0.5 s would give up on a slow link). The ServerApp does it for ``flwr-serverapp``,
the ClientApp shim for ``flwr-clientapp``. Flower itself is not changed; a Flower without these
defaults is left as it is.
"""

from __future__ import annotations

__all__ = ["INITIAL_BACKOFF_S", "BACKOFF_CAP_S", "PATCHED_FUNCTIONS",
           "shorten_object_pull_backoff"]

INITIAL_BACKOFF_S = 0.05
BACKOFF_CAP_S = 0.5
# The functions of flwr.supercore.inflatable.inflatable_utils whose defaults are set.
PATCHED_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")
_KEYWORDS = {"initial_backoff", "backoff_cap", "max_tries_per_object"}


def shorten_object_pull_backoff(initial_s: float = INITIAL_BACKOFF_S,
                                cap_s: float = BACKOFF_CAP_S) -> bool:
    """Set the retry defaults of Flower's object pulls in this process; False if not found."""
    try:
        from flwr.supercore.inflatable import inflatable_utils as utils
    except ImportError:
        return False
    done = False
    for name in PATCHED_FUNCTIONS:
        defaults = getattr(getattr(utils, name, None), "__kwdefaults__", None)
        if defaults and _KEYWORDS <= set(defaults):
            defaults.update(initial_backoff=initial_s, backoff_cap=cap_s,
                            max_tries_per_object=None)
            done = True
    return done
