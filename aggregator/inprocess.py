"""Run the real ServerApp and ClientApps in one process: no Ray, no sockets.

Flower 1.39's simulation engine needs Ray, which this project does not ship. :class:`InProcessGrid`
is a ``Grid`` that hands each pushed message straight to the ClientApp with that site's
``Context`` (node config ``data-path``, ``state-dir``, ``site-name``; node ids 1..N). Replies are
computed lazily, one per ``pull_messages`` call, so the aggregator's fold-as-they-arrive path runs
exactly as it does against a SuperLink.

It needs three private details of Flower 1.39 (the task identity ``Message()`` reads, message
ids, and the ``Run`` a Grid holds); they are isolated in :mod:`flower_layer.identity`, with the
version pin in :mod:`flower_layer.version`.
"""

from __future__ import annotations

import importlib
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fed_unimiss import exchange as ex
from flower_layer.identity import (
    CLIENT_APP_RAISED_EXCEPTION,
    Run,
    assign_message_id,
    empty_run,
    set_task_identity,
)
from flower_layer.version import check_flower_version

__all__ = ["SiteSpec", "InProcessGrid", "check_flower_version", "run_inprocess"]

log = logging.getLogger(__name__)

# The node the ServerApp's messages come from in this grid; the sites are nodes 1..N.
SERVER_NODE_ID = 0


def load_component(reference: str) -> Any:
    """Import a Flower component from its ``"module:attribute"`` reference, as Flower does."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"component reference {reference!r} is not of the form 'module:attr'")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load component {reference!r}: {e}") from e


@dataclass(frozen=True)
class SiteSpec:
    """One simulated site: its label and its image folder."""

    name: str
    data_path: Path
    # Extra node config of this site (its dp-* privacy settings), merged over the defaults.
    node_config: dict[str, Any] = field(default_factory=dict)


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (see the module docstring)."""

    def __init__(
        self,
        client_app: ClientApp,
        sites: Sequence[SiteSpec],
        state_root: str | Path,
        run_id: int | None = None,
    ):
        check_flower_version()
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        self.client_app = client_app
        self._run_id = run_id if run_id is not None else int(time.time() * 1000) % (2**62)
        set_task_identity(self._run_id, SERVER_NODE_ID)
        self._run = empty_run(self._run_id)
        self.contexts: dict[int, Context] = {}
        for node_id, site in enumerate(sites, start=1):
            node_config = {
                ex.NODE_DATA_PATH: str(site.data_path),
                ex.NODE_STATE_DIR: str(Path(state_root) / site.name),
                ex.NODE_SITE_NAME: site.name,
                **site.node_config,
            }
            self.contexts[node_id] = Context(self._run_id, node_id, node_config, RecordDict(), {})
        self._inbox: dict[str, Message] = {}  # pushed, not yet delivered (insertion order)
        self._outbox: dict[str, Message] = {}  # replies computed, not yet pulled

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this grid")
            msg_id = uuid.uuid4().hex
            assign_message_id(msg, msg_id)
            self._inbox[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Deliver at most one waiting message, then return the replies ready for ``message_ids``."""
        wanted = set(message_ids)
        next_id = next((m for m in self._inbox if m in wanted), None)
        if next_id is not None:
            msg = self._inbox.pop(next_id)
            reply = self.deliver(msg)
            if reply is not None:
                assign_message_id(reply, uuid.uuid4().hex)
                self._outbox[next_id] = reply
        return [self._outbox.pop(m) for m in list(self._outbox) if m in wanted]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        replies: list[Message] = []
        end = None if timeout is None else time.monotonic() + timeout
        while pending and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {r.metadata.reply_to_message_id for r in got}
        return replies

    # ------------------------------------------------------------------ delivery
    def deliver(self, msg: Message) -> Message | None:
        """Run the ClientApp on one message (a subclass may drop, delay or alter it)."""
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            return self.client_app(msg, context)
        except Exception:  # noqa: BLE001 - like a SuperNode: a crashing ClientApp is an error reply
            log.exception("ClientApp of node %d raised", msg.metadata.dst_node_id)
            return Message(Error(CLIENT_APP_RAISED_EXCEPTION, "ClientApp raised an exception"),
                           reply_to=msg)


def run_inprocess(
    server_app: ServerApp,
    grid: Grid,
    run_config: dict[str, Any],
) -> None:
    """Call the ServerApp's main with ``grid`` and a Context holding ``run_config``."""
    run_id = grid.run.run_id
    context = Context(run_id, SERVER_NODE_ID, {}, RecordDict(), dict(run_config))
    server_app(grid, context)

