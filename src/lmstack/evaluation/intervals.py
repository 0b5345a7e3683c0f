"""Confidence intervals the suites report: Wilson's for a share of items right, a percentile
bootstrap for a mean of per-item scores (pass@k over problems, say).

Deferred imports, for start-up time: numpy is imported inside the bootstrap.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion (well behaved at 0 and 1, unlike the normal one,
    and unlike a bootstrap, which collapses to a point when every item agrees)."""
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # rounded: p = 0 or 1 gives an end of exactly 0 or 1, not 1e-17 off
    return max(0.0, round(centre - half, 12)), min(1.0, round(centre + half, 12))


def bootstrap_interval(
    values: list[float], rounds: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling items with replacement."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return float(data.mean()), float(data.mean())
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(rounds, len(data)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
