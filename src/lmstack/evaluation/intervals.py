"""A percentile bootstrap for a mean of per-item scores (pass@k over problems, say); Wilson's
interval for a share of items right lives in lmstack.util.stats, beside the A/B tests'.

Deferred imports, for start-up time: numpy is imported inside the bootstrap.
"""

from __future__ import annotations


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
