"""Intervals and tests for rates and means, shared by the eval suites and the A/B analysis.

- Wilson's score interval of a rate and Newcombe's hybrid score interval of a difference of
  two rates: both keep their coverage at 0 and 1, where the normal (Wald) ones collapse to a
  point (40 of 40 is not "[1, 1]").
- Fixed-horizon tests: the pooled two-proportion z-test and Welch's z, one look at a sample
  size fixed in advance.
- The mixture sequential probability ratio test (mSPRT) with a normal mixing distribution:
  an always-valid test, whose error rate holds however often the data are looked at and
  whenever the looking stops (Johari, Koomen, Pekelis and Walsh, "Always Valid Inference:
  Continuous Monitoring of A/B Tests", Operations Research 2022; first as arXiv:1512.04922).

References: Wilson (1927), JASA 22:209; Newcombe (1998), Statistics in Medicine 17:873,
method 10. Pure Python (statistics.NormalDist): the report's checks and the simulations in
tests/test_promotion.py import nothing heavy.
"""

from __future__ import annotations

import math
from statistics import NormalDist

STANDARD_NORMAL = NormalDist()


def z_quantile(probability: float) -> float:
    return STANDARD_NORMAL.inv_cdf(probability)


def upper_tail(z: float) -> float:
    """P(Z >= z): the one-sided p-value of a standard normal statistic."""
    return 1 - STANDARD_NORMAL.cdf(z)


def wilson_interval(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion (well behaved at 0 and 1, unlike the normal one,
    and unlike a bootstrap, which collapses to a point when every item agrees)."""
    if n == 0:
        return math.nan, math.nan
    z = z_quantile(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # rounded: p = 0 or 1 gives an end of exactly 0 or 1, not 1e-17 off
    return max(0.0, round(centre - half, 12)), min(1.0, round(centre + half, 12))


def newcombe_interval(
    control: tuple[float, int], treatment: tuple[float, int], confidence: float
) -> tuple[float, float]:
    """Newcombe's hybrid score interval of treatment's rate minus control's, each given as
    (successes, n): the two Wilson intervals' distances combined in quadrature."""
    (x1, n1), (x2, n2) = control, treatment
    p1, p2 = x1 / n1, x2 / n2
    low1, high1 = wilson_interval(x1, n1, confidence)
    low2, high2 = wilson_interval(x2, n2, confidence)
    diff = p2 - p1
    low = diff - math.sqrt((p2 - low2) ** 2 + (high1 - p1) ** 2)
    high = diff + math.sqrt((high2 - p2) ** 2 + (p1 - low1) ** 2)
    return max(-1.0, low), min(1.0, high)


def pooled_proportion_z(control: tuple[float, int], treatment: tuple[float, int]) -> float | None:
    """The two-proportion z statistic of treatment minus control under "no difference"
    (pooled rate); None when every value is the same (no variance to test against)."""
    (x1, n1), (x2, n2) = control, treatment
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (x2 / n2 - x1 / n1) / se if se > 0 else None


def mean_and_variance(values: list[float]) -> tuple[float, float]:
    """The mean and the sample variance (n - 1)."""
    n = len(values)
    mean = sum(values) / n
    return mean, sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0


def welch_z(control: list[float], treatment: list[float]) -> tuple[float, float] | None:
    """(difference of means, its standard error) with each side's own variance."""
    if len(control) < 2 or len(treatment) < 2:
        return None
    m1, v1 = mean_and_variance(control)
    m2, v2 = mean_and_variance(treatment)
    return m2 - m1, math.sqrt(v1 / len(control) + v2 / len(treatment))


def power_two_proportions(base: float, effect: float, n: int, alpha: float) -> float:
    """The power of the one-sided pooled two-proportion z-test at level alpha with n per arm,
    when the treatment's rate is base + effect (the normal approximation)."""
    treated = base + effect
    pooled = (base + treated) / 2
    null_se = math.sqrt(2 * pooled * (1 - pooled) / n)
    true_se = math.sqrt((base * (1 - base) + treated * (1 - treated)) / n)
    return STANDARD_NORMAL.cdf((effect - z_quantile(1 - alpha) * null_se) / true_se)


def samples_for_power(base: float, effect: float, alpha: float, power: float) -> int:
    """The smallest n per arm at which power_two_proportions reaches `power` (0 < effect and
    base + effect < 1: the power grows with n)."""
    high = 2
    while power_two_proportions(base, effect, high, alpha) < power:
        high *= 2
    low = high // 2  # power(low) < power <= power(high), searched by halves
    while low + 1 < high:
        middle = (low + high) // 2
        if power_two_proportions(base, effect, middle, alpha) >= power:
            high = middle
        else:
            low = middle
    return high


def msprt_log_ratio(diff: float, variance: float, mixing_variance: float) -> float:
    """log of the normal-mixture likelihood ratio for "difference = 0", given the estimated
    difference and its variance, mixing over N(0, mixing_variance) alternatives:
    Lambda = sqrt(v / (v + t2)) * exp(t2 * diff^2 / (2 v (v + t2))). Rejecting when
    Lambda >= 1/alpha keeps the type I error at alpha under continuous monitoring."""
    v, t2 = variance, mixing_variance
    return 0.5 * math.log(v / (v + t2)) + t2 * diff * diff / (2 * v * (v + t2))


def msprt_half_width(variance: float, mixing_variance: float, alpha: float) -> float:
    """Half the width of the always-valid (1 - alpha) confidence sequence at this look: the
    differences the mSPRT would not reject."""
    v, t2 = variance, mixing_variance
    return math.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((v + t2) / v)))
