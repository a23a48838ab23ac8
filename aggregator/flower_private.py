"""The only place that touches Flower 1.39 internals; everything else uses its public API.

The in-process grid (:mod:`aggregator.inprocess`) plays the SuperLink's part, and Flower 1.39
offers no public way to do two things a SuperLink does (FLOWER-1.39.md, section 6):

- give a pushed message, and the reply to it, a message id: ``Metadata.message_id`` is a
  read-only property over the private ``_message_id``;
- tell ``Message()`` which run, node and task it is created in: it reads the private
  ``flwr.supercore.task_identity.TaskIdentity`` and raises without it.

Both are pinned to Flower 1.39.x (:func:`check_flower_version`), and
tests/federation/test_flower_private.py fails loudly when either hook stops working.
"""

from __future__ import annotations

import flwr
from flwr.app import Message

__all__ = ["PINNED_FLOWER", "check_flower_version", "set_task_identity", "assign_message_id",
           "shorten_object_pull_backoff"]

PINNED_FLOWER = "1.39."


def check_flower_version(version: str | None = None) -> None:
    """Refuse to run on a Flower whose private hooks this module was not written for."""
    version = flwr.__version__ if version is None else version
    if not version.startswith(PINNED_FLOWER):
        raise RuntimeError(
            f"the in-process grid was written for flwr {PINNED_FLOWER}x and uses its private "
            f"TaskIdentity and message-id hooks; found flwr {version}. Install flwr>=1.39,<1.40 "
            "or port aggregator/flower_private.py"
        )


def set_task_identity(run_id: int, node_id: int, task_id: int = 1) -> None:
    """Let ``Message()`` be created in this process as if by the task of ``run_id``."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def assign_message_id(msg: Message, message_id: str) -> None:
    """Give ``msg`` the id a SuperLink would give it on push (read back as ``message_id``)."""
    msg.metadata.__dict__["_message_id"] = message_id


def shorten_object_pull_backoff(initial_s: float = 0.05, cap_s: float = 0.5) -> bool:
    """Retry missing message chunks after 0.05 s, at most every 0.5 s, in this process.

    Flower 1.39 backs off 1 s, 2 s, 4 s ... per missing chunk when a message is pulled before its
    chunks arrived; that was ~7 s of every deployed round on loopback (issue 15). The defaults of
    ``pull_objects`` / ``pull_and_inflate_object_from_tree`` are set here, with Flower's 7200 s
    ``PULL_MAX_TIME`` as the only bound. The site's copy: site_client/flower_tuning.py (the
    packages never import each other). Returns False when the hook is not there.
    """
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
