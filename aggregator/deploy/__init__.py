"""Flower deployment at the coordinator: the SuperLink process, run control, the FAB, cleanup.

- ``superlink``: the coordinator kit and the ``flower-superlink`` command line (TLS, site auth).
- ``control``: register site keys, start/poll/stop runs via the Control API (flwr CLI internals).
- ``fab``: the in-memory Flower App Bundle naming the installed ServerApp/ClientApp.
- ``processes``: child processes in their own sessions, recorded PIDs, whole-tree termination.
- ``runner``: ``aggregator start`` as a function (``run_aggregator``) and ``aggregator status``.
"""
