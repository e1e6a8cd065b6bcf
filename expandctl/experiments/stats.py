"""The statistics of a seed study: mean and sample standard deviation, Welch's unequal-variance t-test.

Pure Python (no SciPy at run time): the t distribution's tail is the regularised incomplete beta
function, evaluated by its continued fraction (Numerical Recipes, Sec. 6.4), accurate to ~1e-14.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["mean_std", "welch_t", "welch_p", "t_sf2", "std_error_of_difference"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def std_error_of_difference(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Standard error of ``mean(a) - mean(b)`` without assuming equal variances (Welch)."""
    if len(a) < 2 or len(b) < 2:
        return None
    return math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """``(t, degrees of freedom)`` of Welch's test of ``mean(a) == mean(b)``; ``None`` when undefined
    (fewer than two values on a side, or both samples constant: then ``t`` is infinite or 0/0)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return None
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    return t, df


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (SciPy's ``ttest_ind(a, b, equal_var=False)``), or ``None``
    where the test is undefined (see :func:`welch_t`). Two constant samples with different means give
    0, as in SciPy (an infinite t)."""
    td = welch_t(a, b)
    if td is None:
        if len(a) >= 2 and len(b) >= 2 and statistics.fmean(a) != statistics.fmean(b):
            return 0.0
        return None
    return t_sf2(*td)


def t_sf2(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return min(1.0, _betainc(df / 2, 0.5, df / (df + t * t)))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1) / (a + b + 2):  # the continued fraction converges fast on this side; else use symmetry
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float, eps: float = 1e-16, iterations: int = 10_000) -> float:
    """The continued fraction of ``I_x(a, b)`` by the modified Lentz method."""
    tiny = 1e-300

    def guard(v: float) -> float:
        return tiny if abs(v) < tiny else v

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, iterations):
        m2 = 2 * m
        even = m * (b - m) * x / ((a - 1 + m2) * (a + m2))
        d = 1.0 / guard(1.0 + even * d)
        c = guard(1.0 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1 + m2))
        d = 1.0 / guard(1.0 + odd * d)
        c = guard(1.0 + odd / c)
        step = d * c
        h *= step
        if abs(step - 1.0) < eps:
            break
    return h
