"""Serving metrics, defined as `vllm bench serve` defines them (see REFERENCES.md).

Pure functions over per-request records, so each figure is tested on hand-built
timings: TTFT, TPOT = (e2e - TTFT) / (output_tokens - 1), ITL (every gap between
streamed chunks, pooled), end-to-end latency, request and token throughput, and
goodput (requests per second that meet every SLO).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One measured request. Times are seconds; `chunk_times` are the arrival times of
    streamed chunks that carried output text, relative to the request's start."""

    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2el_s: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    error: str = ""
    status_code: int | None = None
    text: str = ""
    request_id: str = ""  # the gateway's x-lmstack-request-id (feedback names it)

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.chunk_times, self.chunk_times[1:])]

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_s": self.tpot_s}


@dataclass
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def met_by(self, result: RequestResult) -> bool:
        checks = (
            (self.ttft_ms, result.ttft_s),
            (self.tpot_ms, result.tpot_s),
            (self.e2el_ms, result.e2el_s),
        )
        return all(
            limit is None or (value is not None and value * 1000 <= limit)
            for limit, value in checks
        )


def summarize(results: list[RequestResult], duration_s: float, slo: SLO) -> dict[str, float]:
    """The bench's figures: counts, throughputs, goodput, and mean/p50/p90/p99 in ms."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    metrics: dict[str, float] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
        "goodput": sum(slo.met_by(r) for r in done) / duration_s,
    }
    series = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [r.tpot_s for r in done if r.tpot_s is not None],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.e2el_s for r in done],
    }
    for name, values in series.items():
        metrics.update(distribution_ms(name, values))
    return metrics


def distribution_ms(name: str, values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {f"{name}_ms_{stat}": float("nan") for stat in ("mean", "p50", "p90", "p99")}
    ms = np.asarray(values_s) * 1000
    stats = {f"{name}_ms_mean": float(ms.mean())}
    for q in PERCENTILES:
        stats[f"{name}_ms_p{q}"] = float(np.percentile(ms, q))
    return stats


def failure_reasons(results: list[RequestResult]) -> dict[str, int]:
    """How many requests failed for each reason (status code and message)."""
    return dict(Counter(r.error for r in results if not r.ok))
