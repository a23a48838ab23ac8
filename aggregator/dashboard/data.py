"""What the dashboard shows, read from a RUN folder: the run, its rounds, its sites.

The sources are the ones ``aggregator status`` reads: ``rounds.jsonl``, ``aggregator.json`` and
``status.json`` (:mod:`aggregator.run_status`), plus the modification time of each round's
checkpoint sidecar (when the round ended) and the round count of the run's identity in the
latest sidecar. Logs, site folders and checkpoints' tensors are never read.

The registered sites and who is online now come from ``sites-online.json``, which
``aggregator start`` refreshes from the SuperLink (:func:`aggregator.run_summary.sites_online`).

Everything passed on is built from an allow-list: round numbers, counts, metrics, bytes,
seconds, site labels of the aggregator's own form (:func:`site_label` or ``label@node-N``),
the aggregator's own rejection reasons and the run's state, each string cut to one line with
file paths removed. A field a row lacks (older runs) comes out as ``None``; the page shows "—".
Flower's run and node ids are 64-bit: they are sent as strings, which JavaScript cannot round.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.run_status import STATUS_FILE, clean_text, read_json, run_state
from aggregator.run_summary import (  # no torch: see run_summary
    CHECKPOINT_PREFIX,
    ROUNDS_LOG,
    run_id_text,
    sites_online,
)
from fed_unimiss.exchange import PROBE_KINDS, PROBE_NETWORKS, is_valid_site_name

__all__ = ["RunView", "clean_round", "run_view", "read_rows"]

AGGREGATOR_FILE = "aggregator.json"

# Numbers of a rounds.jsonl row (top level) and of one site's ``per_site`` entry passed on.
ROUND_NUMBERS = ("loss", "eval_loss", "samples_2d", "samples_3d", "samples", "seconds",
                 "bytes_in", "bytes_out_per_site")
SITE_NUMBERS = ("loss", "teacher_entropy", "kl", "samples_2d", "samples_3d", "seconds",
                "samples_per_s", "steps", "skipped", "update_norm", "bytes_in")
_DUPLICATE = re.compile(r"^(?P<name>.+)@node-\d+$")  # strategy: two replies declared one name
_STAGE = re.compile(r"^stage[1-9]$")


def read_rows(out: Path) -> list[dict[str, Any]]:
    """Complete rows of rounds.jsonl (a torn last line waits for its newline)."""
    try:
        data = (out / ROUNDS_LOG).read_bytes()
    except OSError:
        return []
    rows = []
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _label(name: Any) -> str | None:
    """A site label as the aggregator writes it; anything else (a path, free text) is None."""
    if is_valid_site_name(name):
        return str(name)
    match = _DUPLICATE.match(name) if isinstance(name, str) else None
    return name if match and is_valid_site_name(match["name"]) else None


def _site_map(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {}
    return {label: v for k, v in value.items() if (label := _label(k)) is not None}


def _probe_scores(value: Any) -> dict[str, dict[str, dict[str, float | None]]]:
    """network -> stage -> kind -> balanced accuracy, of the known names only."""
    value = value if isinstance(value, dict) else {}
    return {net: {stage: {k: _num(kinds.get(k)) for k in PROBE_KINDS}
                  for stage, kinds in value[net].items()
                  if isinstance(stage, str) and _STAGE.match(stage) and isinstance(kinds, dict)}
            for net in PROBE_NETWORKS if isinstance(value.get(net), dict)}


def _clean_probe(value: Any) -> dict[str, Any] | None:
    """A round's probe of the global model (aggregator/probe_report.py), allow-listed."""
    if not isinstance(value, dict):
        return None
    return {"after_rounds": _num(value.get("after_rounds")), "items": _num(value.get("items")),
            "weighted": _probe_scores(value.get("weighted")),
            "per_site": {s: {"items": _num(v.get("items")), **_probe_scores(v)}
                         for s, v in _site_map(value.get("per_site")).items()
                         if isinstance(v, dict)}}


def clean_round(row: dict[str, Any], ended_at: float | None) -> dict[str, Any] | None:
    """The allow-listed view of one rounds.jsonl row; None for a row without a round number."""
    rnd = row.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int):
        return None
    out: dict[str, Any] = {"round": rnd, "ended_at": ended_at}
    for key in ROUND_NUMBERS:
        out[key] = _num(row.get(key))
    sites = row.get("sites")
    out["sites"] = [s for s in sites if _label(s)] if isinstance(sites, list) else []
    per_site = out["bytes_out_per_site"]
    out["bytes_out"] = per_site * len(out["sites"]) if per_site is not None else None
    out["per_site"] = {site: {k: _num(v.get(k)) for k in SITE_NUMBERS}
                       for site, v in _site_map(row.get("per_site")).items()
                       if isinstance(v, dict)}
    out["eval_per_site"] = {s: _num(v) for s, v in _site_map(row.get("eval_per_site")).items()}
    out["epsilon"] = {s: _num(v) for s, v in _site_map(row.get("epsilon")).items()}
    out["epsilon_budget"] = {s: _num(v)
                             for s, v in _site_map(row.get("epsilon_budget")).items()}
    out["rejected"] = {s: clean_text(v) or "rejected"
                       for s, v in _site_map(row.get("rejected")).items()}
    out["probe"] = _clean_probe(row.get("probe"))
    missing = row.get("missing_nodes")
    out["missing_nodes"] = ([str(n) for n in missing if isinstance(n, int)
                             and not isinstance(n, bool)] if isinstance(missing, list) else [])
    absent = row.get("absent")
    out["absent"] = ([s for s in absent if is_valid_site_name(s)]
                     if isinstance(absent, list) else [])
    # The global teacher entropy: the sites' values weighted by their sample counts.
    weighted = [(v["teacher_entropy"], (v["samples_2d"] or 0) + (v["samples_3d"] or 0) or 1.0)
                for v in out["per_site"].values() if v["teacher_entropy"] is not None]
    out["teacher_entropy"] = (sum(e * n for e, n in weighted) / sum(n for _, n in weighted)
                              if weighted else None)
    return out


def round_split(row: dict[str, Any], simulated: bool) -> tuple[float | None, float | None]:
    """(site compute, coordination) seconds of a round.

    Deployed sites train in parallel, so the round waits for the slowest; a simulated federation
    runs its sites one after another in one process, so their times add up. Coordination is the
    rest: sending, receiving, checking, averaging, evaluating, saving. DP sites keep their
    timings private: a round with no site time has no split.
    """
    total = row["seconds"]
    times = [v["seconds"] for v in row["per_site"].values() if v["seconds"] is not None]
    if total is None or not times:
        return None, None
    compute = min(sum(times) if simulated else max(times), total)
    return compute, total - compute


def _sites(rounds: list[dict[str, Any]], online: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per site seen in a round or registered; ``online`` is None when unknown."""
    table: dict[str, dict[str, Any]] = {}
    now_online = online["online"]

    def entry(site: str) -> dict[str, Any]:
        return table.setdefault(site, {
            "site": site, "last_seen_round": None, "last_seen_at": None, "rounds_joined": 0,
            "rejections": 0, "rejection_reasons": [], "samples_2d": 0, "samples_3d": 0,
            "last_loss": None, "dp": False, "epsilon": None, "epsilon_budget": None,
            "registered": site in online["registered"],
            "online": None if now_online is None else site in now_online})

    for site in online["registered"]:
        entry(site)
    for row in rounds:
        for site in set(row["sites"]) | set(row["rejected"]):
            e = entry(site)
            e["last_seen_round"], e["last_seen_at"] = row["round"], row["ended_at"]
        for site in row["sites"]:
            e = entry(site)
            e["rounds_joined"] += 1
            m = row["per_site"].get(site, {})
            e["samples_2d"] += int(m.get("samples_2d") or 0)
            e["samples_3d"] += int(m.get("samples_3d") or 0)
            if m.get("loss") is not None:
                e["last_loss"] = m["loss"]
        for site, why in row["rejected"].items():
            e = entry(site)
            e["rejections"] += 1
            e["rejection_reasons"] = (e["rejection_reasons"]
                                      + [f"round {row['round']}: {why}"])[-5:]
        for key in ("epsilon", "epsilon_budget"):
            for site, value in row[key].items():
                if value is not None:
                    e = entry(site)
                    e[key], e["dp"] = value, True
    return sorted(table.values(), key=lambda e: e["site"])


@dataclass
class RunView:
    """The three API documents of one RUN folder at one moment."""

    run: dict[str, Any]
    rounds: list[dict[str, Any]]
    sites: list[dict[str, Any]]


def _target(out: Path, last_round: int) -> int | None:
    """The run's number of rounds: its status records, else the latest sidecar's identity."""
    identity = (read_json(out / f"{CHECKPOINT_PREFIX}{last_round:04d}.json").get("run")
                if last_round else None)
    for value in (read_json(out / AGGREGATOR_FILE).get("rounds"),
                  read_json(out / STATUS_FILE).get("rounds"),
                  identity.get("rounds") if isinstance(identity, dict) else None):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def run_view(out: str | Path) -> RunView:
    """Read RUN once and build /api/run, /api/rounds and /api/sites from it."""
    out = Path(out)
    simulated = not (out / AGGREGATOR_FILE).exists()
    rounds: list[dict[str, Any]] = []
    for raw in read_rows(out):
        rnd = raw.get("round")
        sidecar = out / f"{CHECKPOINT_PREFIX}{rnd:04d}.json" if isinstance(rnd, int) else None
        try:
            ended = sidecar.stat().st_mtime if sidecar is not None else None
        except OSError:
            ended = None
        row = clean_round(raw, ended)
        if row is not None:
            row["site_compute_s"], row["coordination_s"] = round_split(row, simulated)
            rounds.append(row)
    done = rounds[-1]["round"] if rounds else 0
    target = _target(out, done)
    state, why = run_state(out, done, target)
    started = _num(read_json(out / STATUS_FILE).get("started_at"))
    run_id = read_json(out / AGGREGATOR_FILE).get("run_id")
    online = sites_online(out)
    secs = [r["seconds"] for r in rounds if r["seconds"] is not None]
    recent = secs[-5:]
    per_round = sum(recent) / len(recent) if recent else None
    now = time.time()
    eta = None
    if state == "running" and per_round is not None and target:
        since = rounds[-1]["ended_at"]
        eta = max(0.0, (target - done) * per_round - (now - since if since else 0.0))
    run = {
        "name": out.resolve().name,
        "kind": "simulate" if simulated else "aggregator start",
        "state": state,
        "why": why,
        "run_id": run_id_text(run_id),
        "rounds_done": done,
        "rounds_target": target,
        "started_at": started,
        "seconds_per_round": per_round,
        "eta_s": eta,
        "last_round_at": rounds[-1]["ended_at"] if rounds else None,
        "sites": len({s for r in rounds for s in r["sites"] + list(r["rejected"])}),
        "last_loss": rounds[-1]["loss"] if rounds else None,
        # who the SuperLink sees online now (None: unknown, no aggregator running)
        "sites_registered": online["registered"],
        "sites_online": online["online"],
        "online_at": online["at"],
        "now": now,
    }
    return RunView(run=run, rounds=rounds, sites=_sites(rounds, online))
