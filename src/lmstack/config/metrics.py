"""The figures phase=bench reports (lmstack.serving.metrics.summarize), each with the direction
that is better: any of them is a `bench.metric` a sweep can optimize. Beside the phases'
headlines (config/phases.py) this is every metric whose direction lmstack knows by name."""

from __future__ import annotations

from lmstack.config.phases import Direction

_COUNTS: dict[str, Direction] = {
    "completed": "maximize",
    "failed": "minimize",
    "duration_s": "minimize",
    "prompt_tokens": "maximize",
    "output_tokens": "maximize",
    "request_throughput": "maximize",
    "output_throughput": "maximize",
    "total_token_throughput": "maximize",
    "goodput": "maximize",
    # bench.score_prompts: the built-in task's verifier score on the same endpoint
    "task_score": "maximize",
}
_LATENCIES: dict[str, Direction] = {
    f"{figure}_ms_{stat}": "minimize"
    for figure in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "p50", "p90", "p99")
}
BENCH_FIGURES: dict[str, Direction] = _COUNTS | _LATENCIES
