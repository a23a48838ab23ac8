"""The probe numbers of the sites, as rounds.jsonl, ``aggregator status`` and the dashboard show
them (no torch, no Flower: ``aggregator status`` imports this).

A train reply of a round that asked for the probe may carry, from a site holding a labelled
probe set, balanced accuracies of the global teacher and student it received (k-NN and linear,
per encoder stage; :func:`fed_unimiss.exchange.probe_key`) and the number of items it scored.
:func:`read_probe` keeps exactly those keys, as finite numbers in range; :func:`probe_row` is a
round's ``probe`` entry: per site, and the mean over sites weighted by their items. The
numbers describe the global model the round *started* from (after ``round - 1`` rounds).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fed_unimiss import exchange as ex

__all__ = ["read_probe", "probe_row", "probe_series", "last_stage", "deepest_stages"]

log = logging.getLogger(__name__)

Scores = dict[str, dict[str, dict[str, float]]]  # network -> "stageN" -> kind -> accuracy


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_probe(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"items", "seconds", "teacher": {...}, "student": {...}}`` from a reply's metrics, or
    None when it holds no (usable) probe numbers. Values out of [0, 1] drop the whole probe."""
    if metrics is None:
        return None
    scores: Scores = {}
    for key in metrics.keys():
        match = ex.PROBE_KEY.match(str(key))
        if match is None:
            continue
        value = _number(metrics.get(key))
        if value is None or not 0.0 <= value <= 1.0:
            log.warning("probe metric %s is not a balanced accuracy in [0, 1]: probe ignored", key)
            return None
        network, stage, kind = match.groups()
        scores.setdefault(network, {}).setdefault(f"stage{stage}", {})[kind] = value
    items = _number(metrics.get(ex.PROBE_ITEMS))
    if not scores:
        return None
    if items is None or items < 1:
        log.warning("probe metrics without a positive %s: probe ignored", ex.PROBE_ITEMS)
        return None
    seconds = _number(metrics.get(ex.PROBE_SECONDS))
    return {"items": items, "seconds": seconds,
            **{net: dict(sorted(scores[net].items())) for net in ex.PROBE_NETWORKS
               if net in scores}}


def _weighted(per_site: dict[str, dict[str, Any]]) -> Scores:
    sums: dict[tuple[str, str, str], list[float]] = {}
    for site in per_site.values():
        for network in ex.PROBE_NETWORKS:
            for stage, kinds in (site.get(network) or {}).items():
                for kind, value in kinds.items():
                    acc = sums.setdefault((network, stage, kind), [0.0, 0.0])
                    acc[0] += value * site["items"]
                    acc[1] += site["items"]
    out: Scores = {}
    for (network, stage, kind), (total, weight) in sorted(sums.items()):
        out.setdefault(network, {}).setdefault(stage, {})[kind] = total / weight
    return out


def probe_row(per_site: dict[str, dict[str, Any]], round_num: int) -> dict[str, Any]:
    """A round's ``probe`` entry in rounds.jsonl."""
    return {"after_rounds": round_num - 1,
            "items": sum(s["items"] for s in per_site.values()),
            "weighted": _weighted(per_site),
            "per_site": dict(sorted(per_site.items()))}


def last_stage(scores: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The deepest stage's {kind: accuracy} of one network's scores (what a glance shows)."""
    if not isinstance(scores, Mapping) or not scores:
        return None
    stage = max(scores, key=lambda s: int(s[len("stage"):]) if s[len("stage"):].isdigit() else 0)
    value = scores[stage]
    return dict(value) if isinstance(value, Mapping) else None


def _stage_number(name: str) -> int:
    return int(name[len("stage"):]) if name[len("stage"):].isdigit() else 0


def deepest_stages(scores: Mapping[str, Any] | None, count: int) -> dict[int, dict[str, float]]:
    """``{stage number: {kind: accuracy}}`` of the ``count`` deepest stages of one network's
    scores, deepest first: the deepest stage alone is the noisiest read-out of a short run."""
    if not isinstance(scores, Mapping):
        return {}
    names = sorted(scores, key=_stage_number, reverse=True)[:count]
    return {_stage_number(n): dict(scores[n]) for n in names if isinstance(scores[n], Mapping)}


def probe_series(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per probed round: the round, after how many rounds, items, weighted and per-site scores."""
    out = []
    for row in rows:
        probe = row.get("probe")
        if not isinstance(probe, dict):
            continue
        out.append({"round": row.get("round"), "after_rounds": probe.get("after_rounds"),
                    "items": probe.get("items"), "weighted": probe.get("weighted") or {},
                    "per_site": probe.get("per_site") or {}})
    return out
