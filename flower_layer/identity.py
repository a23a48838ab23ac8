"""What a SuperLink does to messages that Flower 1.39 offers no public way to do.

The in-process grid plays the SuperLink's part (docs/flower.md, "In-process, without Ray"):

- ``Message()`` reads which run, node and task it is created in from the private
  ``flwr.supercore.task_identity.TaskIdentity`` and raises without it;
- a pushed message, and the reply to it, get a message id, but ``Metadata.message_id`` is a
  read-only property over the private ``_message_id``;
- a Grid holds a ``Run``, whose class lives in the private ``flwr.supercore.run``.

The error code a SuperNode replies with when a ClientApp raises comes from Flower's private
``flwr.common.constant`` too.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.supercore.run import Run

__all__ = [
    "Run",
    "CLIENT_APP_RAISED_EXCEPTION",
    "set_task_identity",
    "assign_message_id",
    "empty_run",
]

CLIENT_APP_RAISED_EXCEPTION: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def set_task_identity(run_id: int, node_id: int, task_id: int = 1) -> None:
    """Let ``Message()`` be created in this process as if by the task of ``run_id``."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def assign_message_id(msg: Message, message_id: str) -> None:
    """Give ``msg`` the id a SuperLink would give it on push (read back as ``message_id``)."""
    msg.metadata.__dict__["_message_id"] = message_id


def empty_run(run_id: int) -> Run:
    """The ``Run`` a Grid reports before any run config is set, as Flower builds it."""
    return Run.create_empty(run_id)
