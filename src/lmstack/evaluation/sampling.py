"""Non-determinism: scores of several sampled runs as a mean and a confidence interval.

Greedy decoding (temperature 0) gives one answer per prompt, the same on every run; with a
temperature, `num_samples` answers per prompt give `num_samples` scores, summarised by their
mean and a Student-t interval (the runs are the independent draws).

scipy (installed with lm-eval, not by lmstack itself) is imported where used.
"""

from __future__ import annotations

import math
from typing import Any


def mean_ci(values: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, standard deviation and a t-interval of per-run scores (a point for one run)."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return {"mean": mean, "std": 0.0, "ci_low": mean, "ci_high": mean, "n": n}
    from scipy import stats

    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def score_samples(scores: list[list[float]], confidence: float) -> dict[str, Any]:
    """`scores[row][k]`: sample k's score on a row. Each sample k is one run over all rows."""
    num_samples = len(scores[0]) if scores else 0
    per_run = [sum(row[k] for row in scores) / len(scores) for k in range(num_samples)]
    summary = mean_ci(per_run, confidence)
    summary["per_sample"] = per_run
    # share of rows where any of the samples is right (pass@k with k = num_samples)
    summary["pass_at_k"] = sum(max(row) for row in scores) / len(scores) if scores else math.nan
    return summary
