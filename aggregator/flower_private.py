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

__all__ = ["PINNED_FLOWER", "check_flower_version", "set_task_identity", "assign_message_id"]

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
