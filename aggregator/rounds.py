"""The round loop: push instructions, fold replies as they arrive, honour deadline and quorum.

Flower's ``Strategy.start`` calls ``grid.send_and_receive``, which returns only when every reply
is in (or the timeout passes) and sleeps 3 s between pulls. Here each round pushes its messages,
then polls ``grid.pull_messages`` every ``poll_interval`` seconds and hands each reply to the
strategy at once, so a reply's tensors are folded and freed before the next one is read. At the
deadline the round aggregates if ``min_sites`` replies were accepted, and otherwise stops the run
with :class:`RoundFailed`; the checkpoints of earlier rounds stay as they were.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from aggregator.run_store import RunStore
from aggregator.run_summary import RoundRecord, round_row
from aggregator.strategy import DimensionAwareStrategy
from aggregator.validation import ReplyLimits
from aggregator.verdicts import last_word_messages
from fed_unimiss import exchange as ex
from fed_unimiss.config import ConfigError, to_dict
from fed_unimiss.exchange_config import describe
from fed_unimiss.federation import FederationConfig, load_federation, resolve_recipe
from fed_unimiss.secure_aggregation import SecureAggregationError
from fed_unimiss.secure_aggregation.wire import STAGES

__all__ = ["RoundFailed", "FederationRun", "absent_sites", "collect_replies", "initial_state",
           "run_federation"]

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """A round ended without enough valid replies; the run stops, earlier rounds are kept."""


# How long the run's end waits for sites to take its last message (the decision on their last
# update): a SuperNode picks a message up within ~3 s and a ClientApp starts in ~2 s.
LAST_WORD_WAIT_S = 30.0


def wait_for_nodes(grid: Grid, needed: int, timeout: float, poll: float) -> list[int]:
    """Node ids once at least ``needed`` nodes are connected, or those there are at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll)


def collect_replies(
    grid: Grid,
    messages: list[Message],
    on_reply: Callable[[Message], Any],
    deadline: float,
    poll: float,
) -> list[int]:
    """Push ``messages``, feed each reply to ``on_reply`` as it arrives, stop at ``deadline``.

    Returns the destination node ids that did not reply in time. Empties ``messages`` once
    they are pushed: Flower has the payloads then, and the round need not hold them.
    """
    targets: dict[str, int] = {}
    # push_messages keeps the order and gives None for a message it could not push.
    for msg_id, msg in zip(list(grid.push_messages(messages)), messages, strict=False):
        if msg_id is None:
            log.warning("could not push a message to node %d", msg.metadata.dst_node_id)
            continue
        targets[msg_id] = msg.metadata.dst_node_id
    messages.clear()
    pending = set(targets)
    while pending:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            on_reply(reply)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return sorted(targets[m] for m in pending)


def initial_state(recipe: Any, total_steps: int) -> dict[str, torch.Tensor]:
    """The round-0 global state: a fresh student/teacher pair seeded by the recipe."""
    from fed_unimiss.ssl.engine import SelfDistillation

    return SelfDistillation(recipe, total_steps).exchange_state()


@dataclass
class FederationRun:
    """Everything one federated run needs, resolved at the coordinator."""

    cfg: FederationConfig
    recipe: Any
    rounds: int
    out: Path

    @classmethod
    def from_files(cls, config_path: str | Path, out: str | Path, rounds: int) -> FederationRun:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds: must be a positive integer, got {rounds!r}")
        cfg = load_federation(config_path)
        recipe = resolve_recipe(cfg, config_path)
        if recipe.ssl.steps_per_epoch is None:
            raise ConfigError(
                f"{config_path}: recipe ssl.steps_per_epoch must be set for a federation: the "
                "coordinator cannot see the sites' data, and every site must share the 2D/3D "
                "epoch schedule (set it, or steps_per_epoch in recipe_overrides)"
            )
        return cls(cfg, recipe, rounds, Path(out))

    def identity(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (saved in every sidecar)."""
        from fed_unimiss.ssl.config import recipe_to_dict

        cfg = {k: v for k, v in to_dict(self.cfg).items() if k != "recipe"}
        # A resumed run may use a longer timeout, a different poll interval or another
        # transport of the same state (exchange): not the state.
        for key in ("round_timeout", "poll_interval", "exchange"):
            cfg.pop(key, None)
        return {"federation": cfg, "recipe": recipe_to_dict(self.recipe), "rounds": self.rounds}


def _run_round(
    grid: Grid, run: FederationRun, strategy: DimensionAwareStrategy, round_num: int,
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cfg = run.cfg
    started = time.monotonic()
    deadline = started + cfg.round_timeout
    nodes = wait_for_nodes(grid, cfg.min_sites, cfg.round_timeout, cfg.poll_interval)
    phases: dict[str, Any] = {}  # where the round's time went at the coordinator
    t = time.monotonic()
    messages = strategy.configure_train(round_num, state, nodes)
    phases["encode_s"] = time.monotonic() - t
    log.info("round %d/%d: training on %d site(s)", round_num, run.rounds, len(nodes))
    accept_s, first = [0.0], [None]
    pushed = time.monotonic()
    phases["pushed_at"] = time.time()  # epoch: benchmarks line it up with the sites' logs
    arrived: dict[str, float] = {}

    def accept(reply: Message) -> None:
        t0 = time.monotonic()
        arrived[str(reply.metadata.src_node_id)] = time.time()
        if first[0] is None:
            first[0] = t0 - pushed
        strategy.accept_train(reply)
        accept_s[0] += time.monotonic() - t0

    missing = collect_replies(grid, messages, accept, deadline, cfg.poll_interval)
    phases["collect_s"] = time.monotonic() - pushed
    phases["first_reply_s"] = first[0] if first[0] is not None else phases["collect_s"]
    phases["decode_validate_s"] = accept_s[0]
    phases["arrived_at"] = arrived  # node id -> epoch seconds the reply was pulled
    t = time.monotonic()
    strategy.close_round()  # screen the replies against each other, fold the survivors
    phases["screen_s"] = time.monotonic() - t
    if strategy.num_accepted < cfg.min_sites:
        raise RoundFailed(
            f"round {round_num}: {strategy.num_accepted} valid replie(s) from {len(nodes)} "
            f"site(s) by the {cfg.round_timeout:g} s deadline, but min_sites={cfg.min_sites} are "
            f"needed; the last complete round's checkpoint in {run.out} is intact"
            + _rejection_note(strategy.record)
        )
    if strategy.secure is not None:
        new_state = _secure_stages(grid, run, strategy, round_num, phases, missing)
    else:
        t = time.monotonic()
        new_state = strategy.aggregate_train()
        phases["aggregate_s"] = time.monotonic() - t
    if cfg.evaluate:
        t = time.monotonic()
        eval_deadline = time.monotonic() + cfg.round_timeout
        eval_msgs = strategy.configure_evaluate(round_num, new_state, nodes)
        collect_replies(grid, eval_msgs, strategy.accept_evaluate, eval_deadline,
                        cfg.poll_interval)
        phases["evaluate_s"] = time.monotonic() - t
    row = round_row(strategy.record, describe(cfg.exchange), time.monotonic() - started,
                    missing)
    row["phases"] = phases
    return new_state, row


def _secure_stages(grid: Grid, run: FederationRun, strategy: DimensionAwareStrategy,
                   round_num: int, phases: dict[str, Any], missing: list[int]
                   ) -> dict[str, torch.Tensor]:
    """The stages of a secure round after its train replies, each with the round's deadline;
    returns the new global state. A site silent at a stage has dropped (it joins ``missing``);
    fewer survivors than the threshold or ``min_sites``, or an aggregate that fails its checks,
    fail the round with :class:`RoundFailed`, like a round below ``min_sites``."""
    cfg, secure = run.cfg, strategy.secure
    assert secure is not None
    try:
        for stage in STAGES:
            t = time.monotonic()
            messages = secure.messages(stage)
            missing += collect_replies(grid, messages, secure.accept,
                                       time.monotonic() + cfg.round_timeout, cfg.poll_interval)
            phases[f"secure_{stage}_s"] = time.monotonic() - t
        t = time.monotonic()
        new_state = strategy.aggregate_train()
        phases["aggregate_s"] = time.monotonic() - t
    except SecureAggregationError as e:
        raise RoundFailed(
            f"round {round_num}: secure aggregation failed: {e}; the last complete round's "
            f"checkpoint in {run.out} is intact" + _rejection_note(strategy.record)) from None
    if strategy.num_accepted < cfg.min_sites:
        raise RoundFailed(
            f"round {round_num}: {strategy.num_accepted} site(s) in the secure sum, but "
            f"min_sites={cfg.min_sites} are needed; the last complete round's checkpoint in "
            f"{run.out} is intact" + _rejection_note(strategy.record))
    return new_state


def absent_sites(registered: list[str], row: dict[str, Any]) -> list[str]:
    """The registered sites the round heard nothing from: not connected when it began (a site
    that connects late misses it), or no reply by its deadline. A site whose reply came but was
    not used is in ``rejected``, not here."""
    heard = {str(label).split("@node-")[0]
             for label in [*row.get("sites", []), *row.get("rejected", {}),
                           *row.get("decisions", {})]}
    return sorted(set(registered) - heard)


def _rejection_note(record: RoundRecord) -> str:
    """Why replies were dropped (e.g. every DP site refused: its privacy budget is spent)."""
    if not record.rejected:
        return ""
    reasons = "; ".join(f"{site}: {why.reason}" for site, why in sorted(record.rejected.items()))
    if record.only_budget_refusals():
        return f". Every replying site refused: privacy budget exhausted ({reasons})"
    return f". Rejected replies: {reasons}"


def run_federation(
    grid: Grid,
    run: FederationRun,
    resume: bool = False,
    initial: dict[str, torch.Tensor] | None = None,
    registered: list[str] | None = None,
    roster: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) all rounds; returns the last round's rounds.jsonl row.

    ``initial`` replaces the recipe-seeded round-0 state (tests with hand-made tensors).
    ``registered`` (the coordinator kit's sites) adds each round's ``absent`` sites to its row.
    ``roster`` (site -> identity public key) is what ``exchange.up: secure`` plans rounds with.
    """
    identity = run.identity()
    store = RunStore(run.out)
    done, state = store.start(identity, resume)
    total_steps = run.rounds * run.cfg.local_steps
    if state is None:
        state = initial if initial is not None else initial_state(run.recipe, total_steps)
    classes = ex.classify_exchange_keys(state)
    recipe_json = json.dumps(identity["recipe"], sort_keys=True)  # the recipe every site trains
    limits = ReplyLimits.of_run(run.cfg, run.recipe, state)
    log.info("reply bounds: update norm %s; counts %s",
             {k: round(v, 4) for k, v in limits.part_bounds(state).items()}, limits.counts)
    log.info("DP plan announced to the sites: at most %g expected patients per step (a DP site "
             "set higher adopts it or refuses before training)", limits.dp_patients_per_step)
    strategy = DimensionAwareStrategy(run.cfg, recipe_json, run.rounds, classes, limits,
                                      spill_dir=run.out / ".spill", roster=roster)
    log.info("exchange: %s", describe(run.cfg.exchange))
    replays = store.load_replays(done) if done else None
    if replays is not None:
        strategy.restore_replays(*replays)
        log.info("replay checks: %d state(s) and reply digest(s) remembered from before the "
                 "restart", len(json.loads(replays[1]["seen"])))
    row: dict[str, Any] = {}
    if done >= run.rounds:
        log.info("%s already holds all %d round(s); nothing to do", run.out, run.rounds)
    # A round's checkpoint is written while the next round trains: the sites never wait for
    # the disk. One write at a time, each finished (checkpoint, then its rounds.jsonl row)
    # before the next starts, so a crash still leaves the last complete round to resume from.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
    pending: Future | None = None
    try:
        for round_num in range(done + 1, run.rounds + 1):
            try:
                state, row = _run_round(grid, run, strategy, round_num, state)
            except RoundFailed:
                tell_last_verdicts(grid, strategy, run.cfg)
                raise
            if registered is not None:
                row["absent"] = absent_sites(registered, row)
            if pending is not None:
                pending.result()  # the previous round's write, and any error it raised
            pending = writer.submit(_save_round, store, round_num, state, row, identity,
                                    strategy.replay_snapshot())
            log.info("round %d/%d done: sites=%s loss=%s rejected=%d", round_num, run.rounds,
                     row["sites"], row["loss"], len(row["rejected"]))
        if pending is not None:
            pending.result()
        tell_last_verdicts(grid, strategy, run.cfg)
    finally:
        writer.shutdown(wait=True)
        strategy.close()
    return row


def tell_last_verdicts(grid: Grid, strategy: DimensionAwareStrategy, cfg: FederationConfig
                       ) -> None:
    """The run's last word: tell each site whose last update was clipped or rejected, and why.

    Earlier rounds' decisions travel in the next train instruction; after the last round (or a
    round that failed its quorum) there is none, so a message of type ``query`` carries them
    (aggregator/verdicts.py). Best effort: a site that does not take it within
    :data:`LAST_WORD_WAIT_S` (or ``round_timeout``) misses it; the run's outcome is unchanged.
    """
    messages = last_word_messages(strategy.last_verdicts())
    if not messages:
        return
    wait = min(cfg.round_timeout, LAST_WORD_WAIT_S)
    try:
        missed = collect_replies(grid, messages, lambda _reply: None, time.monotonic() + wait,
                                 cfg.poll_interval)
    except Exception as e:  # noqa: BLE001 - the run's own outcome must come through unchanged
        log.warning("could not tell the sites why their last update was not used: %s", e)
        return
    if missed:
        log.warning("node(s) %s did not take the decision on their last update within %g s",
                    ", ".join(str(n) for n in missed), wait)


def _save_round(store: RunStore, round_num: int, state: dict[str, torch.Tensor],
                row: dict[str, Any], identity: dict[str, Any],
                replays: tuple[dict[str, torch.Tensor], dict[str, str]]) -> None:
    t = time.monotonic()
    store.save_round(round_num, state, row, identity)
    store.save_replays(round_num, *replays)  # after the checkpoint: never ahead of it
    log.info("round %d: checkpoint written in %.2f s", round_num, time.monotonic() - t)
