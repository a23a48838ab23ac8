"""The federation's Flower ServerApp (component reference ``aggregator.server_app:app``).

Run config keys (``flwr run --run-config`` in deployment; the in-process runner passes the
same): ``config`` (absolute path of the federation YAML, read here at the coordinator), ``out``
(absolute RUN directory), ``rounds`` and optionally ``resume``. See docs/federation.md.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from aggregator.rounds import FederationRun, run_federation
from fed_unimiss import exchange as ex

__all__ = ["app"]

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config, then run or resume every round (errors end the run non-zero)."""
    rc = context.run_config
    missing = [k for k in (ex.RUN_CONFIG, ex.RUN_OUT, ex.RUN_ROUNDS) if k not in rc]
    if missing:
        raise ValueError(
            f"run config lacks {', '.join(missing)}; pass e.g. --run-config "
            "'config=\"/abs/federation.yaml\" out=\"/abs/RUN\" rounds=3'"
        )
    rounds = rc[ex.RUN_ROUNDS]
    if isinstance(rounds, float) and rounds.is_integer():
        rounds = int(rounds)
    run = FederationRun.from_files(str(rc[ex.RUN_CONFIG]), str(rc[ex.RUN_OUT]), rounds)
    resume = bool(rc.get(ex.RUN_RESUME, False))
    last = run_federation(grid, run, resume=resume)
    log.info("federation finished: %d round(s) in %s (last loss %s)", run.rounds, run.out,
             last.get("loss"))
