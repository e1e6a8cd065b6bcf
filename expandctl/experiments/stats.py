"""The statistics of a seed study: mean and sample standard deviation, Welch's unequal-variance
t-test, the paired t-test over seeds, Holm-Bonferroni adjusted p-values, and the smallest difference
a study could detect (power analysis).

Pure Python (no SciPy at run time; the tests compare with SciPy): the t distribution's tail is the
regularised incomplete beta function, evaluated by its continued fraction (Numerical Recipes,
Sec. 6.4), accurate to ~1e-14; the noncentral t's tail (the power of a t-test) is a one-dimensional
integral over the chi distribution of the sample standard deviation, by Simpson's rule.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = [
    "mean_std",
    "welch_t",
    "welch_p",
    "paired_t",
    "paired_p",
    "holm",
    "t_sf2",
    "t_quantile",
    "t_power",
    "detectable_difference",
    "seeds_to_detect",
    "std_error_of_difference",
]


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


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float] | None:
    """``(t, degrees of freedom, standard error)`` of the paired t-test of ``mean(a - b) == 0`` over
    pairs ``(a[i], b[i])``; ``None`` when undefined (fewer than two pairs, or every difference equal)."""
    if len(a) != len(b):
        raise ValueError(f"a paired test needs as many values on each side ({len(a)} vs {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return None
    se = math.sqrt(statistics.variance(d) / len(d))
    if se == 0:
        return None
    return statistics.fmean(d) / se, len(d) - 1, se


def paired_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test (SciPy's ``ttest_rel(a, b)``), or ``None`` where it is
    undefined (see :func:`paired_t`). Equal non-zero differences give 0, as in SciPy (an infinite t)."""
    t = paired_t(a, b)
    if t is None:
        if len(a) >= 2 and any(x != y for x, y in zip(a, b)):
            return 0.0
        return None
    return t_sf2(t[0], t[1])


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in the order given (``None`` entries are not tests and stay
    ``None``): the i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``, so that
    rejecting every adjusted p below alpha keeps the family-wise error rate at most alpha."""
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m, out, running = len(order), [None] * len(ps), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def t_sf2(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return min(1.0, _betainc(df / 2, 0.5, df / (df + t * t)))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (SciPy's ``t.ppf``), by
    bisection on :func:`t_sf2`."""
    if not 0 < q < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    tail = 2 * min(q, 1 - q)  # P(|T| >= t) at the quantile
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > tail:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf2(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return (lo + hi) / 2 if q > 0.5 else -(lo + hi) / 2


def t_power(shift: float, df: float, alpha: float = 0.05, steps: int = 400) -> float:
    """Power of the two-sided t-test at level ``alpha`` when the true mean is ``shift`` standard
    errors away from 0: ``P(|T'| > c)``, ``T'`` noncentral t with ``df`` and noncentrality ``shift``,
    ``c = t_quantile(1 - alpha / 2, df)``. With ``s`` the sample standard deviation over the true one
    (``df * s**2`` is chi-square with ``df``), ``P(T' > c) = E[Phi(shift - c s)]``: Simpson's rule
    over the density of ``s``."""
    c = t_quantile(1 - alpha / 2, df)
    k = df / 2
    log_norm = math.log(2 * df) - k * math.log(2) - math.lgamma(k)

    def density(s: float) -> float:  # of s = sqrt(V / df), V chi-square(df): f_V(df s^2) * 2 df s
        if s <= 0:
            return math.sqrt(2 / math.pi) if df == 1 else 0.0  # df = 1: s is half-normal
        v = df * s * s
        return math.exp(log_norm + (k - 1) * math.log(v) - v / 2 + math.log(s))

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    # s concentrates at 1 with spread ~ 1 / sqrt(2 df). Near 0 its density goes as s**(df - 1), not smooth
    # for a Welch df in (1, 2): there s = top * u**4 makes the integrand smooth in u.
    spread = 1 / math.sqrt(2 * df)
    low, top = max(0.0, 1 - 10 * spread), 1 + 12 * spread + 1
    exponent = 4 if low == 0 else 1
    h = 1 / steps
    total = 0.0
    for i in range(steps + 1):
        u = i * h
        s = low + (top - low) * u**exponent
        jacobian = (top - low) * exponent * u ** (exponent - 1)
        w = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += w * jacobian * density(s) * (phi(shift - c * s) + phi(-shift - c * s))
    return min(1.0, total * h / 3)


def detectable_difference(std_error: float, df: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided t-test at level ``alpha`` detects with probability
    ``power``, for a difference estimated with ``std_error`` on ``df`` degrees of freedom: ``delta * std_error``
    where the noncentral t with ``df`` and noncentrality ``delta`` exceeds the critical value with
    probability ``power`` (:func:`t_power`, solved by bisection)."""
    if std_error == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_power(hi, df, alpha) < power:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if t_power(mid, df, alpha) < power:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-7 * hi:
            break
    return hi * std_error


def seeds_to_detect(std: float, difference: float, alpha: float = 0.05, power: float = 0.8, most: int = 100_000
                    ) -> int | None:  # fmt: skip
    """Seeds per strategy for a paired test at level ``alpha`` to detect ``difference`` with ``power``,
    when the per-seed differences have standard deviation ``std``: the smallest ``n >= 2`` with
    ``detectable_difference(std / sqrt(n), n - 1) <= |difference|``; ``None`` for no difference or more
    than ``most``."""
    if difference == 0:
        return None
    if std == 0:
        return 2

    def enough(n: int) -> bool:
        return detectable_difference(std / math.sqrt(n), n - 1, alpha, power) <= abs(difference)

    lo, hi = 1, 2  # enough(hi) after the doubling; not enough(lo), or lo == 1 (no test with one seed)
    while not enough(hi):
        if hi >= most:
            return None
        lo, hi = hi, min(2 * hi, most)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid
    return hi


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
