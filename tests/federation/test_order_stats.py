"""The sorting network behind the medians and trimmed mean gives exactly torch.sort's order."""

from __future__ import annotations

import pytest
import torch

from aggregator.order_stats import coordinate_median, leave_one_out_medians, sorted_rows


@pytest.mark.parametrize("n", range(1, 18))
def test_rows_come_out_sorted_per_column_exactly_as_torch_sorts_them(n):
    g = torch.Generator().manual_seed(n)
    stacked = torch.randn(n, 500, generator=g, dtype=torch.float64)
    stacked[:, :50] = stacked[:, :50].round()  # ties
    stacked[0, 60], stacked[-1, 61] = float("inf"), float("-inf")
    expected = stacked.sort(dim=0).values
    assert torch.equal(torch.stack(sorted_rows(stacked)), expected)
    ordered = stacked.float().sort(dim=0).values
    median = 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])
    torch.testing.assert_close(coordinate_median(stacked.float()), median, rtol=0, atol=0,
                               equal_nan=True)  # inf + -inf in one column: nan both ways


def test_an_even_count_takes_the_mean_of_the_middle_two():
    stacked = torch.tensor([[1.0], [10.0], [2.0], [4.0]])
    assert coordinate_median(stacked).item() == 3.0


@pytest.mark.parametrize("n", range(2, 12))
def test_each_rows_median_of_the_others_is_the_median_with_that_row_taken_out(n):
    g = torch.Generator().manual_seed(100 + n)
    stacked = torch.randn(n, 400, generator=g)
    stacked[:, :200] = (2 * stacked[:, :200]).round()  # many ties
    stacked[:, 200:220] = 1.5  # a column of equal values
    got = leave_one_out_medians(stacked)
    for i in range(n):
        others = torch.cat([stacked[:i], stacked[i + 1:]])
        assert torch.equal(got[i], coordinate_median(others)), i


def test_leave_one_out_needs_another_row():
    with pytest.raises(ValueError, match="needs >= 2 rows"):
        leave_one_out_medians(torch.zeros(1, 3))
