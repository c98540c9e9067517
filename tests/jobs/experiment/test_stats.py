"""Paired differences and their Student-t intervals, written from the math in
jobs/experiment/stats.py, against scipy.stats."""

from __future__ import annotations

import math
import random

import pytest

from jobs.experiment.stats import paired_difference, regularized_beta, t_cdf, t_quantile

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 200])
@pytest.mark.parametrize("q", [0.001, 0.025, 0.3, 0.5, 0.8, 0.975, 0.995, 0.9999])
def test_t_quantile_matches_scipy(df, q):
    assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9, abs=1e-12)
    assert t_cdf(t_quantile(q, df), df) == pytest.approx(q, rel=1e-9)


@pytest.mark.parametrize("x", [0.0, 1e-6, 0.2, 0.5, 0.93, 1.0])
@pytest.mark.parametrize(("a", "b"), [(0.5, 0.5), (2.0, 0.5), (12.5, 0.5), (0.3, 7.0)])
def test_regularized_beta_matches_scipy(x, a, b):
    assert regularized_beta(x, a, b) == pytest.approx(stats.beta.cdf(x, a, b), abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_paired_interval_matches_scipy(n):
    rng = random.Random(n)
    a = [0.8 + rng.gauss(0, 0.02) for _ in range(n)]
    b = [x - 0.01 + rng.gauss(0, 0.01) for x in a]
    diff = paired_difference(a, b)
    reference = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert diff.n == n
    assert diff.mean == pytest.approx(sum(a) / n - sum(b) / n)
    assert (diff.low, diff.high) == pytest.approx((reference.low, reference.high), rel=1e-9)
    d = [x - y for x, y in zip(a, b, strict=True)]
    sem = stats.sem(d)
    low, high = stats.t.interval(0.90, n - 1, loc=sum(d) / n, scale=sem)
    narrower = paired_difference(a, b, confidence=0.90)
    assert (narrower.low, narrower.high) == pytest.approx((low, high), rel=1e-9)


def test_degenerate_pairs():
    empty = paired_difference([], [])
    assert empty.n == 0 and math.isnan(empty.mean) and empty.text() == "no pairs"
    one = paired_difference([0.7], [0.5])
    assert one.mean == pytest.approx(0.2) and math.isnan(one.low) and not one.above
    assert one.text() == "+20.0 points (n=1, no interval)"
    same = paired_difference([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])  # every difference 0.1
    assert (same.low, same.high) == pytest.approx((0.1, 0.1)) and same.above
    assert same.text() == "+10.0 points (95% CI +10.0 to +10.0, n=3)"
    assert same.short() == "+10.0 [+10.0, +10.0]" and one.short() == "+20.0"
    with pytest.raises(ValueError, match="as many"):
        paired_difference([0.1, 0.2], [0.1])
