"""Process hygiene of the coordinator's children: see :mod:`fed_unimiss.processes`.

The implementation is shared with the site client (``site_client.supernode``) and lives in
``fed_unimiss.processes``; this module keeps the ``aggregator.deploy`` import path.
"""

from fed_unimiss.processes import (
    ProcessSet,
    alive,
    descendants,
    kill_recorded,
    session_members,
    terminate_pids,
    tree_sessions,
)

__all__ = [
    "ProcessSet",
    "tree_sessions",
    "session_members",
    "descendants",
    "terminate_pids",
    "kill_recorded",
    "alive",
]
