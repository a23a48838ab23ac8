"""Differences paired by seed and their 95 % t-intervals, for both quality reports (phantom and
real inputs): the seed is what two arms share, so its variation cancels in the difference."""

from __future__ import annotations

import math
import statistics

__all__ = ["paired", "t_halfwidth"]


def t_halfwidth(vals: list[float]) -> float:
    """Half-width of the 95 % t-interval of the mean (NaN for fewer than two values)."""
    if len(vals) < 2:
        return math.nan
    from scipy import stats

    return float(stats.t.ppf(0.975, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals)))


def paired(a: dict[int, float | None], b: dict[int, float | None]) -> dict | None:
    """Mean and 95 % t-interval half-width of a[s] - b[s] over the seeds s both have (None
    when fewer than two pairs): the seed is what the two runs share, so its variation cancels."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())
             if a[s] is not None and b[s] is not None]
    if len(diffs) < 2:
        return None
    return {"mean": statistics.mean(diffs), "ci95": t_halfwidth(diffs), "n": len(diffs)}
