"""Balanced accuracy per class, and the mean with a 95 % t-interval over seeds.

numpy only (no scipy at run time): the Student-t quantile is found by bisection on a numerically
integrated density, exact to ~1e-6 for the handful of seeds a probe runs.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["class_recalls", "balanced_accuracy", "t_quantile", "mean_interval"]


def class_recalls(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy on the items of each class (its recall); None for a class absent from ``truth``."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    out: list[float | None] = []
    for c in range(num_classes):
        mine = truth == c
        out.append(float((pred[mine] == c).mean()) if mine.any() else None)
    return out


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``truth``: chance is 1 / (classes present),
    whatever the class sizes, so a large background cannot carry the score."""
    recalls = [r for r in class_recalls(pred, truth, num_classes) if r is not None]
    if not recalls:
        raise ValueError("balanced_accuracy: no item to score")
    return float(np.mean(recalls))


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for x >= 0: 0.5 + the integral of the t density from 0 to x (Simpson)."""
    grid = np.linspace(0.0, x, 4001)
    log_norm = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
                - 0.5 * math.log(df * math.pi))
    pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid ** 2 / df))
    h = grid[1] - grid[0]
    simpson = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    return 0.5 + float(simpson)


@functools.lru_cache(maxsize=64)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float | None]) -> dict[str, float | int | None]:
    """{mean, low, high, n} of the non-missing ``values``: a 95 % t-interval of the mean
    (low = high = None with fewer than two values: one seed has no spread to report)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(np.mean(vals))
    if len(vals) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = t_quantile(0.975, len(vals) - 1) * float(np.std(vals, ddof=1)) / math.sqrt(len(vals))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(vals)}
