"""flower_layer against the installed Flower: the pin, the private names it imports, the hooks.

A Flower upgrade that changes any internal the project relies on fails here, by name, before any
federation or deployment test (docs/flower.md lists those internals).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import flwr
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from flower_layer import backoff, identity
from flower_layer.version import PINNED_FLOWER, check_flower_version

LAYER = Path(__file__).resolve().parents[2] / "flower_layer"


def test_installed_flower_is_the_pinned_line():
    assert flwr.__version__.startswith(PINNED_FLOWER)
    check_flower_version()
    with pytest.raises(RuntimeError, match="1.40.0"):
        check_flower_version("1.40.0")


def test_pin_agrees_with_the_dependency_line():
    pyproject = (LAYER.parent / "pyproject.toml").read_text()
    major_minor = PINNED_FLOWER.rstrip(".")
    assert f'"flwr>={major_minor}.0,<' in pyproject


def _flwr_imports() -> list[tuple[str, str | None]]:
    """(module, name) of every flwr import in the layer; name None for ``import module``."""
    found = []
    for path in sorted(LAYER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flwr":
                found += [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "flwr"]
    return found


def test_every_flower_name_the_layer_imports_exists():
    imports = _flwr_imports()
    assert imports, "the layer imports nothing from flwr?"
    missing = []
    for module, name in imports:
        mod = importlib.import_module(module)
        if name is None or hasattr(mod, name):
            continue
        try:  # ``from package import submodule``
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            missing.append(f"{module}.{name}")
    assert missing == []


def test_backoff_patch_sets_the_defaults_of_the_functions_it_patches():
    from flwr.supercore.inflatable import inflatable_utils as utils

    saved = {n: dict(getattr(utils, n).__kwdefaults__) for n in backoff.PATCHED_FUNCTIONS}
    try:
        assert backoff.shorten_object_pull_backoff() is True
        for name in backoff.PATCHED_FUNCTIONS:
            defaults = getattr(utils, name).__kwdefaults__
            assert defaults["initial_backoff"] == backoff.INITIAL_BACKOFF_S
            assert defaults["backoff_cap"] == backoff.BACKOFF_CAP_S
            assert defaults["max_tries_per_object"] is None
            # Flower's overall bound is what ends a pull now; the patch leaves it alone.
            assert defaults["max_time"] == saved[name]["max_time"]
    finally:
        for name, defaults in saved.items():
            getattr(utils, name).__kwdefaults__.update(defaults)


def test_the_patched_functions_still_read_their_backoff_from_those_keywords():
    """A Flower that moves the backoff elsewhere would leave the patch a silent no-op."""
    from flwr.supercore.inflatable import inflatable_utils as utils

    for name in backoff.PATCHED_FUNCTIONS:
        source = inspect.getsource(getattr(utils, name))
        assert "initial_backoff" in source and "backoff_cap" in source, name


def test_error_code_is_the_one_the_project_has_always_sent():
    """Sites' and the aggregator's logs and tests read this number; Flower must not renumber it."""
    assert identity.CLIENT_APP_RAISED_EXCEPTION == 2


def test_empty_run_has_the_run_id():
    assert identity.empty_run(42).run_id == 42


def test_task_identity_lets_messages_be_created_and_ids_be_assigned():
    identity.set_task_identity(run_id=123, node_id=0)
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), 7, "train", group_id="1")
    assert msg.metadata.run_id == 123 and msg.metadata.dst_node_id == 7
    assert msg.metadata.message_id == ""  # a SuperLink assigns it on push
    identity.assign_message_id(msg, "pushed-1")
    assert msg.metadata.message_id == "pushed-1"
    reply = Message(Error(1, "x"), reply_to=msg)
    assert reply.metadata.reply_to_message_id == "pushed-1"
    identity.assign_message_id(reply, "reply-1")
    assert reply.metadata.message_id == "reply-1"


def test_message_id_still_has_no_public_setter():
    """If Flower adds one, use it in flower_layer/identity.py instead of the private field."""
    identity.set_task_identity(run_id=123, node_id=0)
    msg = Message(RecordDict(), 7, "train", group_id="1")
    with pytest.raises(AttributeError):
        msg.metadata.message_id = "x"  # type: ignore[misc]
