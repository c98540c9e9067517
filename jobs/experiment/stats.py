"""Paired differences between two arms over seeds, with Student-t confidence intervals, written
from the math (no SciPy at run time; tests/jobs/experiment compares them with scipy.stats).

Two arms run with the same seed see the same split, the same initial weights' seed and the same
data order, so their results are compared seed by seed: d_i = a_i - b_i. With n pairs, mean
d and sample standard deviation s (n - 1 in the denominator), the 95% interval of the mean
difference is d +- t_{0.975, n-1} s / sqrt(n), where t_{q, nu} is the q-quantile of Student's t
with nu degrees of freedom. Its CDF for t >= 0 is 1 - I_x(nu/2, 1/2) / 2 with x = nu / (nu + t^2),
I the regularized incomplete beta function, evaluated by its continued fraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_TINY = 1e-300
_EPS = 1e-15


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz method): 1 / (1 + d1 / (1 + d2 /
    ...)) with d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)) and
    d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))."""

    def guard(value: float) -> float:
        return value if abs(value) > _TINY else _TINY

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    fraction = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d = 1.0 / guard(1.0 + even * d)
        c = guard(1.0 + even / c)
        fraction *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 / guard(1.0 + odd * d)
        c = guard(1.0 + odd / c)
        step = d * c
        fraction *= step
        if abs(step - 1.0) < _EPS:
            break
    return fraction


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1 and a, b > 0. Raises ValueError outside that domain."""
    if not (0.0 <= x <= 1.0) or a <= 0 or b <= 0:
        raise ValueError(f"regularized_beta needs 0 <= x <= 1, a, b > 0; got {x}, {a}, {b}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        a * math.log(x)
        + b * math.log1p(-x)
        - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    )
    # The fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with `df` degrees of freedom (0 < q < 1), by bisection
    on the CDF. Raises ValueError outside that domain."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < q:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedDifference:
    """The mean of a - b over n pairs, its `confidence` interval [low, high], and the sample
    standard deviation of the differences. With fewer than 2 pairs the interval is NaN."""

    n: int
    mean: float
    low: float
    high: float
    sd: float
    confidence: float = 0.95

    @property
    def above(self) -> bool:
        """The whole interval lies above 0 (a beats b beyond seed noise)."""
        return self.n >= 2 and self.low > 0

    def short(self, scale: float = 100.0) -> str:
        """e.g. "+1.2 [-0.3, +2.7]" (the interval left out with fewer than 2 pairs)."""
        if self.n == 0:
            return "n/a"
        if self.n < 2:
            return f"{self.mean * scale:+.1f}"
        return f"{self.mean * scale:+.1f} [{self.low * scale:+.1f}, {self.high * scale:+.1f}]"

    def text(self, scale: float = 100.0, unit: str = " points") -> str:
        """e.g. "+1.2 points (95% CI -0.3 to +2.7, n=5)"."""
        if self.n == 0:
            return "no pairs"
        head = f"{self.mean * scale:+.1f}{unit}"
        if self.n < 2:
            return f"{head} (n=1, no interval)"
        level = f"{self.confidence * 100:.0f}%"
        return (
            f"{head} ({level} CI {self.low * scale:+.1f} to {self.high * scale:+.1f}, n={self.n})"
        )


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> PairedDifference:
    """The paired difference a_i - b_i (same seed, same split) with its t-interval. Raises
    ValueError when the lists differ in length."""
    if len(a) != len(b):
        raise ValueError(f"paired values must be as many: {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, confidence)
    mean = math.fsum(diffs) / n
    if n == 1:
        return PairedDifference(1, mean, math.nan, math.nan, math.nan, confidence)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half, sd, confidence)
