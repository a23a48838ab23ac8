"""The rows of RUN/rounds.jsonl: what the strategy writes for each round, and what
``aggregator status`` (and the dashboard) read back, without torch or Flower.

The row's writer and its readers sit in one file so that a field is added, renamed or read in
one place. ``aggregator status`` must answer in a second or two while a federation trains on the
same machine; importing torch or Flower alone takes several seconds on a loaded 2-core machine,
so nothing here (or in :mod:`aggregator.run_status`) imports them at module level: the round's
outcomes are plain records, and the screening's verdict is read through its own ``as_row``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from aggregator.probe_report import probe_row, probe_series, read_probe
from aggregator.run_status import STATUS_FILE, process_gone, read_json, run_state
from fed_unimiss import exchange as ex
from fed_unimiss.exchange import is_valid_site_name
from fed_unimiss.privacy.report import reported_budget, reported_delta

if TYPE_CHECKING:
    from aggregator.screening import Verdict
    from aggregator.validation import SiteReport

__all__ = ["SiteResult", "BudgetRefusal", "Rejection", "TrainOutcome", "RoundCosts",
           "RoundRecord", "round_row", "RoundsTail", "read_rounds", "last_run_of_kit", "run_summary", "screening_summary",
           "round_costs", "sites_online", "run_id_text",
           "epsilon_spent", "ROUNDS_LOG", "CHECKPOINT_PREFIX", "STATE_FILE", "LAST_RUN",
           "ONLINE_FILE"]

ROUNDS_LOG = "rounds.jsonl"
CHECKPOINT_PREFIX = "global_round_"  # RUN/global_round_NNNN.safetensors + .json
STATE_FILE = "aggregator.json"
LAST_RUN = "last-run"  # in the coordinator kit: the RUN folder of the latest start
ONLINE_FILE = "sites-online.json"  # written by aggregator.deploy.runner.OnlineRecord


@dataclass
class SiteResult:
    """One accepted train reply, as recorded in rounds.jsonl (numbers only)."""

    node_id: int
    label: str
    report: SiteReport
    update_norm: float | None  # None under up: secure (the update is never readable)
    bytes_in: int
    norms: dict[str, float] | None = field(default_factory=dict)  # per part; None: secure
    verdict: Verdict | None = None  # the round's screening, once the round closes
    digest: str = ""  # of the reply as sent (replay guard)

    def as_row(self) -> dict[str, Any]:
        """Its rounds.jsonl entry; under up: secure without norm fields (nothing to report)."""
        row = {
            "node_id": self.node_id,
            ex.SAMPLES_2D: self.report.samples_2d,
            ex.SAMPLES_3D: self.report.samples_3d,
            "update_norm": self.update_norm,
            "bytes_in": self.bytes_in,
            **self.report.metrics,
            "norms": self.norms,
            **self.verdict_row(),
        }
        if self.norms is None:
            del row["update_norm"], row["norms"]
        return row

    def verdict_row(self) -> dict[str, Any]:
        # A reply the screening has not judged yet counts as accepted (it passed every check).
        if self.verdict is not None:
            return self.verdict.as_row()
        return {"action": "accepted"} if self.norms is None \
            else {"action": "accepted", "vs_median": {}}


@dataclass(frozen=True)
class BudgetRefusal:
    """A DP site refused the round: its privacy budget would be exceeded."""

    action: ClassVar[str] = "refused"
    label: str
    epsilon: float  # spent so far (NaN if the site reported none)

    @property
    def reason(self) -> str:
        return f"refused: privacy budget exhausted (epsilon spent {self.epsilon:.4g})"


@dataclass(frozen=True)
class Rejection:
    """A reply the strategy did not fold; ``reason`` names our checks, never the site's text."""

    action: ClassVar[str] = "rejected"
    label: str
    reason: str
    # Numbers behind a screening rejection (norms, norm / round median, cosine), else None.
    detail: dict[str, Any] | None = None
    # What the site is told instead of ``reason`` when that names another site's numbers or
    # label (the round's medians, a replayed reply of another site); None: ``reason`` itself.
    site_reason: str | None = None


TrainOutcome = SiteResult | BudgetRefusal | Rejection


@dataclass
class RoundCosts:
    """Where one round's time and bytes went, per site label (train message, bytes as sent)."""

    seconds: dict[str, float] = field(default_factory=dict)  # local training
    bytes_down: dict[str, int] = field(default_factory=dict)  # its instruction
    bytes_up: dict[str, int] = field(default_factory=dict)  # its reply
    # node id -> its train instruction as sent (arrays + config); they differ only with a
    # shared base (the int8 change or the base in full)
    sent: dict[int, int] = field(default_factory=dict)

    @property
    def bytes_out_per_site(self) -> int:
        """One train instruction of the round as sent; the largest, if they differ."""
        return max(self.sent.values(), default=0)

    def note(self, label: str, seconds: float | None, bytes_up: int, node_id: int) -> None:
        """A reply of ``label`` from ``node_id``: its training time and bytes both ways."""
        if seconds is not None:
            self.seconds[label] = seconds
        self.bytes_up[label] = bytes_up
        self.bytes_down[label] = self.sent.get(node_id, self.bytes_out_per_site)


@dataclass
class RoundRecord:
    """What one round did with each site's reply, as the strategy learns it: the row's content."""

    round_num: int
    accepted: list[SiteResult] = field(default_factory=list)  # folded, in order
    rejected: dict[str, BudgetRefusal | Rejection] = field(default_factory=dict)  # by label
    # The screening's settings, the round's part bounds and its median norms (close_round).
    screening: dict[str, Any] = field(default_factory=dict)
    costs: RoundCosts = field(default_factory=RoundCosts)
    epsilon: dict[str, float] = field(default_factory=dict)  # DP sites: epsilon spent so far
    epsilon_budget: dict[str, float] = field(default_factory=dict)  # DP sites: their target
    delta: dict[str, float] = field(default_factory=dict)  # DP sites: the delta of their epsilon
    evaluated: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> loss, n
    probed: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> probe numbers

    def note_reports(self, label: str, metrics: Mapping[str, Any] | None) -> None:
        """Keep what a train reply reports beside its update, whatever becomes of the update:
        its probe of the global model it was sent, and a DP site's target epsilon and delta
        (settings the dashboard and the model card show beside the epsilon spent)."""
        probe = read_probe(metrics)
        if probe is not None:
            self.probed[label] = probe
        budget = reported_budget(metrics)
        if budget is not None:
            self.epsilon_budget[label] = budget
        delta = reported_delta(metrics)
        if delta is not None:
            self.delta[label] = delta

    def add_evaluation(self, label: str, metrics: Mapping[str, Any] | None) -> str | None:
        """Keep a site's evaluation loss and example count; or say why there is none to keep."""
        if metrics is None:
            return f"no evaluation from {label}"
        loss, n = metrics.get(ex.LOSS), metrics.get(ex.NUM_EXAMPLES, 1)
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return f"evaluation of {label} has no finite loss"
        if not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
            n = 1
        self.evaluated[label] = {ex.LOSS: float(loss), ex.NUM_EXAMPLES: float(n)}
        return None

    def reject(self, outcome: BudgetRefusal | Rejection) -> None:
        self.rejected[outcome.label] = outcome
        if isinstance(outcome, BudgetRefusal):
            self.epsilon[outcome.label] = outcome.epsilon

    def only_budget_refusals(self) -> bool:
        """True when the round rejected replies and every one was a privacy-budget refusal."""
        rejected = self.rejected.values()
        return bool(rejected) and all(isinstance(r, BudgetRefusal) for r in rejected)


def round_row(record: RoundRecord, exchange: str, seconds: float, missing: list[int]
              ) -> dict[str, Any]:
    """The rounds.jsonl row: who took part, their counts and metrics, who was dropped and why.

    ``exchange`` describes the codecs the round's tensors travelled in.
    """
    accepted = sorted(record.accepted, key=lambda r: r.label)
    total = sum(r.report.samples for r in accepted)
    losses = [(r.report.metrics[ex.LOSS], r.report.samples) for r in accepted
              if ex.LOSS in r.report.metrics]
    loss = sum(v * n for v, n in losses) / sum(n for _, n in losses) if losses else None
    costs = record.costs
    row: dict[str, Any] = {
        "round": record.round_num,
        "sites": [r.label for r in accepted],
        "loss": loss,
        ex.SAMPLES_2D: sum(r.report.samples_2d for r in accepted),
        ex.SAMPLES_3D: sum(r.report.samples_3d for r in accepted),
        "samples": total,
        "per_site": {r.label: r.as_row() for r in accepted},
        "rejected": {k: v.reason for k, v in sorted(record.rejected.items())},
        "decisions": decisions(record),  # every site that replied: what was done and why
        "screening": record.screening,
        "missing_nodes": sorted(missing),
        "seconds": seconds,
        "bytes_out_per_site": costs.bytes_out_per_site,
        "bytes_in": sum(r.bytes_in for r in accepted),
        # what each site cost the round (its train message, bytes as sent), for the dashboard
        "site_seconds": dict(sorted(costs.seconds.items())),
        "bytes_down": dict(sorted(costs.bytes_down.items())),
        "bytes_up": dict(sorted(costs.bytes_up.items())),
        "exchange": exchange,
        "epsilon": dict(sorted(record.epsilon.items())),  # DP site -> epsilon spent so far
        "epsilon_budget": dict(sorted(record.epsilon_budget.items())),  # site -> its target
        "dp_delta": dict(sorted(record.delta.items())),  # DP site -> its delta
    }
    if record.evaluated:
        weight = sum(v[ex.NUM_EXAMPLES] for v in record.evaluated.values()) or 1.0
        row["eval_loss"] = sum(v[ex.LOSS] * v[ex.NUM_EXAMPLES]
                               for v in record.evaluated.values()) / weight
        row["eval_per_site"] = {k: v[ex.LOSS] for k, v in sorted(record.evaluated.items())}
    if record.probed:
        row["probe"] = probe_row(record.probed, record.round_num)
    return row


def decisions(record: RoundRecord) -> dict[str, dict[str, Any]]:
    """label -> {action, reason, norms, vs_median, ...}: accepted, clipped, rejected, refused."""
    out: dict[str, dict[str, Any]] = {}
    for r in record.accepted:
        out[r.label] = {**({"norms": r.norms} if r.norms is not None else {}),
                        **r.verdict_row()}
    for label, outcome in record.rejected.items():
        entry: dict[str, Any] = {"action": outcome.action, "reason": outcome.reason}
        if isinstance(outcome, Rejection) and outcome.detail:
            entry.update(outcome.detail)
        out[label] = entry
    return dict(sorted(out.items()))


class RoundsTail:
    """Rows of RUN/rounds.jsonl not yet seen, by round number (a torn last line waits).

    Rows are told apart by their round, not by byte offsets: a resumed run repairs the file
    (rewrites it to its complete rounds) and then appends, so an offset taken before the repair
    can land in the middle of the next row and lose it.
    """

    def __init__(self, path: Path, skip_existing: bool = True) -> None:
        self.path = path
        self.seen: set[Any] = set()
        if skip_existing:
            self.seen = {self._key(row) for row in self._rows()}

    @staticmethod
    def _key(row: dict[str, Any]) -> Any:
        return row.get("round", json.dumps(row, sort_keys=True))

    def _rows(self) -> list[dict[str, Any]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        rows = []
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def read_new(self) -> list[dict[str, Any]]:
        rows = [row for row in self._rows() if self._key(row) not in self.seen]
        self.seen.update(self._key(row) for row in rows)
        return rows


def read_rounds(out: Path) -> list[dict[str, Any]]:
    return RoundsTail(Path(out) / ROUNDS_LOG, skip_existing=False).read_new()


def last_run_of_kit(kit: str | Path) -> Path | None:
    """The RUN folder the coordinator kit ``kit`` was last started with, if any."""
    marker = Path(kit) / LAST_RUN
    try:
        return Path(marker.read_text().strip())
    except OSError:
        return None


def run_id_text(value: Any) -> str | None:
    """A Flower run id as text: ids are 64-bit, and JavaScript (the dashboard, jq < 1.7) reads
    JSON numbers as doubles, which round them (``...773`` shown as ``...700``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        return None
    return str(value)


def sites_online(out: str | Path) -> dict[str, Any]:
    """The registered sites and who the SuperLink sees online, from RUN/sites-online.json.

    ``online`` is None when unknown: no record (a ``simulate`` run, or an older version), or
    the ``aggregator start`` that wrote it has ended (its SuperLink with it); ``last_online``
    then keeps what was last seen. ``at`` is when the SuperLink was last asked.
    """
    record = read_json(Path(out) / ONLINE_FILE)
    names = lambda key: sorted(str(n) for n in record.get(key) or []  # noqa: E731
                               if is_valid_site_name(n))
    at = record.get("at")
    at = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None
    live = bool(record) and not process_gone(record)
    return {"registered": names("registered"), "online": names("online") if live else None,
            "last_online": names("online"), "at": at}


def run_summary(out: str | Path) -> dict[str, Any]:
    """What ``aggregator status`` shows: rounds done, sites seen, last loss, last run status."""
    out = Path(out)
    rows = read_rounds(out)
    sites: set[str] = set()
    for r in rows:
        sites.update(str(s) for s in r.get("sites", []) or [])
    epsilon = epsilon_spent(rows)
    state: dict[str, Any] = {}
    if (out / STATE_FILE).exists():
        try:
            state = json.loads((out / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
    done = max((int(r.get("round", 0)) for r in rows), default=0)
    target = state.get("rounds") or read_json(out / STATUS_FILE).get("rounds")
    target = target if isinstance(target, int) and not isinstance(target, bool) else None
    run_state_, why = run_state(out, done, target)  # also what the dashboard shows
    last_sites = sorted(str(s) for s in (rows[-1].get("sites") or [])) if rows else []
    resume = state.get("resume_command") if run_state_ == "stopped" else None
    resume = resume if isinstance(resume, str) and resume else None
    if resume and why:  # here, at the coordinator, the command itself
        why = f"{why.split('; ', 1)[0]}; resume with: {resume}"
    return {
        "out": str(out),
        "rounds_done": done,
        "sites_seen": sorted(sites),  # in any round of RUN
        # the last complete round's sites, and the sites seen before but missing from it (a
        # partial resume: who is training now, not who ever did)
        "sites_last_round": last_sites,
        "sites_missing": sorted(sites - set(last_sites)),
        "last_loss": rows[-1].get("loss") if rows else None,
        "run_id": run_id_text(state.get("run_id")),  # text: 64-bit ids (see run_id_text)
        "status": state.get("status", "never started" if not rows else "unknown"),
        "rounds_target": target,
        "epsilon": epsilon,
        "state": run_state_,
        "why": why,
        "resume_command": resume,
        "sites_online": sites_online(out),
        "absent_last_round": sorted(str(s) for s in (rows[-1].get("absent") or [])
                                    if is_valid_site_name(s)) if rows else [],
        "screening": screening_summary(rows),
        "costs": round_costs(rows),
        "probe": probe_series(rows),  # per probed round: weighted and per-site accuracies
    }


def round_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round, its wall time, the exchange, and per site local seconds and bytes."""
    out = []
    for row in rows:
        if "bytes_up" not in row and "site_seconds" not in row:
            continue  # a row written before these fields existed
        out.append({"round": row.get("round"), "seconds": row.get("seconds"),
                    "exchange": row.get("exchange"),
                    "site_seconds": row.get("site_seconds") or {},
                    "bytes_down": row.get("bytes_down") or {},
                    "bytes_up": row.get("bytes_up") or {}})
    return out


def screening_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per site: the last round's update norm against the median, and every clip or rejection.

    Also the teacher's direction cosine of the last round and the lowest the site had while it
    was accepted: how close an honest site came to ``min_cosine`` (docs/federation.md). From
    each rounds.jsonl row's ``decisions``; rows written before they existed are skipped.
    """
    sites: dict[str, dict[str, Any]] = {}
    for row in rows:
        decisions = row.get("decisions")
        if not isinstance(decisions, dict):
            continue
        for site, d in decisions.items():
            if not isinstance(d, dict):
                continue
            entry = sites.setdefault(str(site), {"events": []})
            entry["last_round"] = row.get("round")
            entry["last_action"] = d.get("action")
            entry["norms"] = d.get("norms")
            entry["vs_median"] = d.get("vs_median")
            cosine = (d.get("cosine") or {}).get("teacher")
            entry["cosine"] = cosine if isinstance(cosine, (int, float)) else None
            lowest = entry.get("lowest_accepted_cosine")
            if entry["cosine"] is not None and d.get("action") in ("accepted", "clipped") \
                    and (lowest is None or entry["cosine"] < lowest["cosine"]):
                entry["lowest_accepted_cosine"] = {"cosine": entry["cosine"],
                                                   "round": row.get("round")}
            if d.get("action") in ("clipped", "rejected", "refused"):
                entry["events"].append({"round": row.get("round"), "action": d.get("action"),
                                        "reason": d.get("reason")})
    return dict(sorted(sites.items()))


def epsilon_spent(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per DP site, the latest epsilon it reported (cumulative, so the latest is the total).

    Read from the ``epsilon`` map of each rounds.jsonl row; malformed entries are skipped.
    """
    spent: dict[str, float] = {}
    for row in rows:
        eps = row.get("epsilon")
        if not isinstance(eps, dict):
            continue
        for site, value in eps.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                spent[str(site)] = float(value)
    return dict(sorted(spent.items()))
