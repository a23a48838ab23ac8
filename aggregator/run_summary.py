"""What ``aggregator status`` (and the dashboard) read from a RUN folder, without torch or Flower.

``aggregator status`` must answer in a second or two while a federation trains on the same
machine; importing torch or Flower alone takes several seconds on a loaded 2-core machine, so
nothing here (or in :mod:`aggregator.run_status`) imports them at module level.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from aggregator.probe_report import probe_series
from aggregator.run_status import STATUS_FILE, process_gone, read_json, run_state
from fed_unimiss.exchange import is_valid_site_name

__all__ = ["RoundsTail", "read_rounds", "last_run_of_kit", "run_summary", "screening_summary",
           "round_costs", "sites_online", "run_id_text",
           "epsilon_spent", "ROUNDS_LOG", "CHECKPOINT_PREFIX", "STATE_FILE", "LAST_RUN",
           "ONLINE_FILE"]

ROUNDS_LOG = "rounds.jsonl"
CHECKPOINT_PREFIX = "global_round_"  # RUN/global_round_NNNN.safetensors + .json
STATE_FILE = "aggregator.json"
LAST_RUN = "last-run"  # in the coordinator kit: the RUN folder of the latest start
ONLINE_FILE = "sites-online.json"  # written by aggregator.deploy.runner.OnlineRecord


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
    """Issue 15: per round, its wall time, the exchange, and per site local seconds and bytes."""
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
    each rounds.jsonl row's ``decisions`` (issue 17); rows without them are skipped.
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
