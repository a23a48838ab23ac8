"""Coordinate-wise order statistics over a round's replies, by a sorting network.

The round-relative direction check and the robust aggregation modes need, for every coordinate
of the model, the replies' values in order (a median, a trimmed mean, each reply's median of the
others). ``torch.sort`` along the replies' axis is a general sort per coordinate; with the
handful of replies a round has, a fixed sorting network of elementwise ``minimum``/``maximum``
over whole rows is 4-6x faster on CPU (measured with 3-32 replies of 2 M values) and
gives exactly the same values.

The network is Batcher's odd-even merge sort (Knuth, TAOCP vol. 3, 5.3.4) for any row count:
the comparators of the next power of two that touch a missing row are dropped, which is exact
because a missing row would hold +inf and never move.
"""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["sorted_rows", "coordinate_median", "leave_one_out_medians"]


@lru_cache(maxsize=64)
def _comparators(n: int) -> tuple[tuple[int, int], ...]:
    """(i, j), i < j: after ``min`` into i and ``max`` into j for each in turn, rows are sorted."""
    out = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        out.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(out)


def sorted_rows(stacked: torch.Tensor) -> list[torch.Tensor]:
    """The rows of ``stacked`` (replies, values) sorted per column, smallest first."""
    rows = list(stacked)
    for i, j in _comparators(len(rows)):
        low = torch.minimum(rows[i], rows[j])
        rows[j] = torch.maximum(rows[i], rows[j])
        rows[i] = low
    return rows


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Per column, the median of the rows; with an even count, the mean of the middle two."""
    rows = sorted_rows(stacked)
    n = len(rows)
    return 0.5 * (rows[(n - 1) // 2] + rows[n // 2])


def leave_one_out_medians(stacked: torch.Tensor) -> torch.Tensor:
    """Row i of the result: per column, the median of every row of ``stacked`` but row i.

    One sort serves all rows: taking one value out of a sorted column shifts the middle by at
    most one place, so each row's answer is one of the two or three middle order statistics,
    picked by comparing the row with them (ties give the same answer whichever copy is out).
    With an even count of others, the mean of their middle two, as :func:`coordinate_median`.
    """
    n = stacked.shape[0]
    if n < 2:
        raise ValueError(f"leave_one_out_medians: needs >= 2 rows, got {n}")
    rows = sorted_rows(stacked)
    if n % 2 == 0:  # n - 1 others, odd: their median is one of the two middle values
        low, high = rows[n // 2 - 1], rows[n // 2]
        return torch.where(stacked <= low, high, low)
    below, mid, above = rows[n // 2 - 1], rows[n // 2], rows[n // 2 + 1]
    return torch.where(stacked < mid, 0.5 * (mid + above),
                       torch.where(stacked > mid, 0.5 * (below + mid), 0.5 * (below + above)))
