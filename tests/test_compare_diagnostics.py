"""benchmarks/compare_diagnostics.py: the exact rank-sum test and the rank statistics, against closed forms."""

from __future__ import annotations

import math

import pytest

from benchmarks.compare_diagnostics import midranks, rank_sum_p, spearman


def test_midranks_share_the_mean_rank_among_ties() -> None:
    assert midranks([10.0, 20.0, 20.0, 30.0]) == [1.0, 2.5, 2.5, 4.0]
    assert midranks([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]


@pytest.mark.parametrize("n", [3, 4, 5])
def test_complete_separation_has_the_smallest_two_sided_p(n: int) -> None:
    """Of the C(2n, n) equally likely splits, only the two complete separations are as extreme."""
    low, high = [float(i) for i in range(n)], [float(i) for i in range(n, 2 * n)]
    expected = 2 / math.comb(2 * n, n)
    assert rank_sum_p(low, high) == pytest.approx(expected)
    assert rank_sum_p(high, low) == pytest.approx(expected)


def test_interleaved_samples_are_not_told_apart() -> None:
    # Rank sums 1+4+5+8 = 18 = the mean 2n(2n+1)/4 = 18: every split is at least as extreme.
    assert rank_sum_p([1.0, 4.0, 5.0, 8.0], [2.0, 3.0, 6.0, 7.0]) == pytest.approx(1.0)


def test_spearman_is_one_for_any_increasing_relation_and_minus_one_for_a_decreasing_one() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(x, [v**3 for v in x]) == pytest.approx(1.0)
    assert spearman(x, [-math.exp(v) for v in x]) == pytest.approx(-1.0)
