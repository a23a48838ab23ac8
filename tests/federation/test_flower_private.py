"""The Flower 1.39 internals the in-process grid relies on still behave as aggregator/flower_private.py
assumes; a Flower upgrade that changes them fails here, by name, before any federation test."""

from __future__ import annotations

import flwr
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from aggregator.flower_private import (
    PINNED_FLOWER,
    assign_message_id,
    check_flower_version,
    set_task_identity,
)


def test_installed_flower_is_the_pinned_line():
    assert flwr.__version__.startswith(PINNED_FLOWER)
    check_flower_version()


def test_task_identity_lets_messages_be_created_and_ids_be_assigned():
    set_task_identity(run_id=123, node_id=0)
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), 7, "train", group_id="1")
    assert msg.metadata.run_id == 123 and msg.metadata.dst_node_id == 7
    assert msg.metadata.message_id == ""  # a SuperLink assigns it on push
    assign_message_id(msg, "pushed-1")
    assert msg.metadata.message_id == "pushed-1"
    reply = Message(Error(1, "x"), reply_to=msg)
    assert reply.metadata.reply_to_message_id == "pushed-1"
    assign_message_id(reply, "reply-1")
    assert reply.metadata.message_id == "reply-1"


def test_message_id_still_has_no_public_setter():
    """If Flower adds one, use it in aggregator/flower_private.py instead of the private field."""
    set_task_identity(run_id=123, node_id=0)
    msg = Message(RecordDict(), 7, "train", group_id="1")
    with pytest.raises(AttributeError):
        msg.metadata.message_id = "x"  # type: ignore[misc]
