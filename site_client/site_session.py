"""What a site keeps between rounds in a warm process, and the three steps of its round.

A :class:`SiteSession` belongs to one site (one state directory) in one process: the warm
worker (:mod:`site_client.worker`) or, without a worker, the ClientApp's own process
(``simulate``, tests). Both hold their sessions in a
:class:`~site_client.round_work.SiteSessions` and hand it every request, so a round runs the
same way in either. The session keeps, never sends:

- its end of the exchange (:class:`~fed_unimiss.exchange_link.Exchange`): the base of
  ``down: q8_delta``, the residuals of ``up: q8_delta`` and ``up: secure`` and the site's own
  teacher (``teacher: local``), all forgotten when a new run starts. After every train reply
  they are also written to ``STATE/exchange_memory.safetensors`` (0600, atomically), so a
  worker that restarts between rounds picks up where it was instead of losing a round to a
  full base and a cold residual;
- the site's data index and the plain trainer, reused while the recipe stays the same;
- under ``up: secure``, the round's secure party and ring vector between its stages
  (:mod:`site_client.secure_site`).

A round is three separate steps: :meth:`SiteSession.decode` (the global state as the site
trains from it), :meth:`SiteSession.train` or :meth:`SiteSession.evaluate`, and
:meth:`SiteSession.encode` (the reply). The decisions around them (refusals, DP plan,
progress lines) are in :mod:`site_client.round_work`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fed_unimiss import exchange as ex
from fed_unimiss.checkpoint import CheckpointError, atomic_save_tensors, read_tensors_if
from fed_unimiss.exchange_link import Exchange, Payload
from fed_unimiss.runtime import Runtime, grad_scaler
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.gradient_step import GradientStep, PlainStep
from fed_unimiss.ssl.local import run_local, training_mode
from fed_unimiss.ssl.local_parallel import run_local_data_parallel, usable_workers
from site_client.local_state import SiteState
from site_client.round_messages import RoundReply, RoundRequest

if TYPE_CHECKING:
    from fed_unimiss.secure_aggregation import RoundPlan, SiteParty
    from site_client.instruction import Instruction

__all__ = ["SiteSession", "Trained", "PendingRound", "MEMORY_FILE"]

MEMORY_FILE = "exchange_memory.safetensors"  # in the state directory

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """One round's local training: public metrics, and the new state (None: the privacy
    budget refused, nothing was trained)."""

    public: dict[str, float]
    state: dict[str, torch.Tensor] | None


@dataclass
class PendingRound:
    """What a site holds between the stages of one secure round (never sent as it is;
    site_client/secure_site.py runs the stages)."""

    plan: RoundPlan
    party: SiteParty
    ring_vector: np.ndarray | None  # dropped once masked
    clipped: int


class SiteSession:
    """One site's memory between rounds in this process (see the module docstring)."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.run_id: int | None = None
        self.exchange: Exchange | None = None
        self._data: tuple[Any, Any] | None = None  # (key, SiteData)
        self._engine: tuple[Any, SelfDistillation] | None = None  # (key, plain trainer)
        # A secure round's party and ring vector between its stages (site_client/secure_site.py)
        self.secure: PendingRound | None = None

    def begin(self, run_id: int, job: Instruction) -> Exchange:
        """The exchange of this run: a new run remembers nothing of the last one's; a new
        process takes back what this run's exchange wrote (:meth:`remember`)."""
        if self.exchange is None or self.run_id != run_id or self.exchange.config != job.exchange:
            self.run_id, self.exchange = run_id, Exchange(job.exchange)
            self._recall(run_id, self.exchange)
        return self.exchange

    def remember(self) -> None:
        """Write this run's exchange memory to the state directory (0600; a crash leaves the
        old file or the new one). A failure costs the next restart a round, never this one."""
        if self.exchange is None or self.run_id is None:
            return
        tensors, strings = self.exchange.memory()
        strings = {**strings, "run_id": str(self.run_id),
                   "exchange": _config_key(self.exchange.config)}
        try:
            atomic_save_tensors(self.state_dir / MEMORY_FILE,
                                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                strings, mode=0o600)
        except (OSError, RuntimeError, ValueError) as e:
            log.warning("could not write %s (%s): a restart would lose a round",
                        self.state_dir / MEMORY_FILE, e)

    def _recall(self, run_id: int, exchange: Exchange) -> None:
        path = self.state_dir / MEMORY_FILE
        try:
            found = read_tensors_if(path, lambda meta: meta.get("run_id") == str(run_id)
                                    and meta.get("exchange") == _config_key(exchange.config))
        except CheckpointError as e:
            log.warning("%s; the coordinator sends the full state next round", e)
            return
        if found is None:  # none, or another run's or another exchange's
            return
        base = exchange.restore(*found)
        log.info("exchange memory of run %d taken back from %s (base %s)", run_id, path,
                 "kept" if base else "none")

    def data(self, site: SiteState, job: Instruction, run_id: int) -> Any:
        """The site's data index for this run and recipe (scanned once, then reused)."""
        key = (run_id, job.recipe.data.ct_settings_hash(), job.recipe.data.xray_settings_hash())
        if self._data is None or self._data[0] != key:
            self._data = (key, site.site_data(job.recipe.data, run_id))
        return self._data[1]

    def engine(self, job: Instruction, runtime: Runtime, step: GradientStep | None
               ) -> SelfDistillation:
        """The trainer of this round's recipe; a plain one is built once and reused with a fresh
        optimizer, a DP one is built afresh every round."""
        if step is not None and not isinstance(step, PlainStep):
            return SelfDistillation(job.recipe, job.total_steps, device=runtime.torch_device(),
                                    gradient_step=step, precision=runtime.precision)
        key = (job.recipe_json, job.total_steps, str(runtime.torch_device()), runtime.precision)
        if self._engine is not None and self._engine[0] == key:
            engine = self._engine[1]
            engine.optimizer.state.clear()  # every round starts Adam afresh, as a new trainer does
            engine.scaler = grad_scaler(engine.device, engine.precision)
            return engine
        engine = SelfDistillation(job.recipe, job.total_steps, device=runtime.torch_device(),
                                  gradient_step=PlainStep(), precision=runtime.precision)
        self._engine = (key, engine)
        return engine

    # ------------------------------------------------------------------ the three steps
    def decode(self, req: RoundRequest, job: Instruction) -> dict[str, torch.Tensor]:
        """The global state as this site trains from it; raises ``CodecError``."""
        exchange = self.begin(req.run_id, job)
        payload = Payload({name: torch.from_numpy(np.ascontiguousarray(arr))
                           for name, arr in req.arrays.items()}, config=dict(req.config))
        received = exchange.receive_state(payload, train=req.kind == ex.TRAIN)
        return exchange.with_own_teacher(received)

    def train(self, site: SiteState, job: Instruction, received: dict[str, torch.Tensor],
              data: Any, privacy: Any, runtime: Runtime, seed: int) -> Trained:
        """``job.local_steps`` from ``received``: in several processes when the site has
        workers and no DP, else in this one (plain or DP-SGD). Raises ``LedgerError`` when the
        privacy ledger is unusable."""
        runtime = _usable_runtime(job, runtime)
        if runtime.workers > 1 and privacy is None:  # several processes, one update
            t0 = time.perf_counter()
            public, state = run_local_data_parallel(
                job.recipe, job.total_steps, received, site.state_dir,
                job.start_step, job.local_steps, interval=job.round, runtime=runtime, seed=seed,
                scratch_root=site.state_dir / "rounds")
            public.setdefault(ex.SECONDS, time.perf_counter() - t0)
            return Trained(public, state)
        step, guard = training_mode(job.recipe, privacy, site.state_dir, data, job.local_steps)
        engine = self.engine(job, runtime, step)
        engine.load_exchange_state(received)
        torch.manual_seed(seed)
        local = run_local(engine, data, job.start_step, job.local_steps, guard,
                          interval=job.round)
        return Trained(local.public, engine.exchange_state() if local.trained else None)

    def evaluate(self, job: Instruction, received: dict[str, torch.Tensor], data: Any,
                 runtime: Runtime) -> dict[str, float]:
        """The self-distillation loss of ``received`` on a few local batches."""
        engine = self.engine(job, runtime, None)
        engine.load_exchange_state(received)
        result = engine.evaluate(data, job.eval_batches)
        return {ex.LOSS: float(result["loss"]), ex.NUM_EXAMPLES: int(result.get("batches", 1))}

    def encode(self, site: SiteState, public: dict[str, float],
               new_state: dict[str, torch.Tensor], received: dict[str, torch.Tensor]
               ) -> RoundReply:
        """The train reply: the new state as the exchange sends it, and the public metrics."""
        if self.exchange is None:
            raise RuntimeError("encode before decode: the session has no exchange yet")
        payload = self.exchange.send_update(new_state, received)
        self.remember()
        return RoundReply(public, _numpy(payload.arrays),
                          _numpy(payload.scales) if payload.scales is not None else None,
                          site.site_name)


def _config_key(config: Any) -> str:
    """The exchange config as a string: memory is taken back only under the same one."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)


def _usable_runtime(job: Instruction, runtime: Runtime) -> Runtime:
    """``runtime`` with no more workers than the recipe's batches can feed."""
    workers = usable_workers(job.recipe, runtime.workers)
    if workers < runtime.workers:
        log.warning("the federation's recipe has batches of %d (2D) and %d (3D) with "
                    "accumulate %d: %d of this site's %d workers can take part; training "
                    "with %d", job.recipe.ssl.batch_size_2d, job.recipe.ssl.batch_size_3d,
                    job.recipe.ssl.accumulate, workers, runtime.workers, workers)
        runtime = dataclasses.replace(runtime, workers=workers)
    return runtime


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}
