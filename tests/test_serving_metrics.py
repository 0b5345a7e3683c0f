"""Serving figures on hand-built timings, as `vllm bench serve` defines them."""

from __future__ import annotations

import math

import pytest

from lmstack.serving.metrics import SLO, RequestResult, failure_reasons, summarize


def request(ttft: float, e2el: float, tokens: int, gaps: list[float]) -> RequestResult:
    times = [ttft]
    for gap in gaps:
        times.append(times[-1] + gap)
    return RequestResult(
        ok=True,
        prompt_tokens=10,
        output_tokens=tokens,
        ttft_s=ttft,
        e2el_s=e2el,
        chunk_times=times,
    )


def test_tpot_excludes_the_first_token():
    # 5 tokens: TTFT 0.1 s, then 4 more tokens over 0.4 s -> 0.1 s per output token
    assert request(0.1, 0.5, 5, [0.1] * 4).tpot_s == pytest.approx(0.1)
    assert request(0.1, 0.1, 1, []).tpot_s is None


def test_summary_figures():
    results = [
        request(0.1, 0.5, 5, [0.1, 0.1, 0.1, 0.1]),
        request(0.3, 1.1, 5, [0.2, 0.2, 0.2, 0.2]),
        RequestResult(ok=False, error="HTTP 400: too long", status_code=400),
    ]
    figures = summarize(results, duration_s=2.0, slo=SLO(ttft_ms=200))
    assert figures["completed"] == 2 and figures["failed"] == 1
    assert figures["request_throughput"] == pytest.approx(1.0)
    assert figures["output_throughput"] == pytest.approx(5.0)
    assert figures["total_token_throughput"] == pytest.approx(15.0)
    # only the first request meets TTFT <= 200 ms
    assert figures["goodput"] == pytest.approx(0.5)
    assert figures["ttft_ms_mean"] == pytest.approx(200.0)
    assert figures["tpot_ms_p50"] == pytest.approx(150.0)
    # ITL pools every gap: four of 100 ms and four of 200 ms
    assert figures["itl_ms_mean"] == pytest.approx(150.0)
    assert figures["itl_ms_p99"] == pytest.approx(200.0)
    assert figures["e2el_ms_p50"] == pytest.approx(800.0)
    assert failure_reasons(results) == {"HTTP 400: too long": 1}


def test_goodput_checks_every_slo():
    fast = request(0.05, 0.25, 5, [0.05] * 4)
    slow_tokens = request(0.05, 2.05, 5, [0.5] * 4)
    figures = summarize([fast, slow_tokens], duration_s=1.0, slo=SLO(ttft_ms=100, tpot_ms=100))
    assert figures["goodput"] == pytest.approx(1.0)
    assert summarize([fast], 1.0, SLO())["goodput"] == pytest.approx(1.0)


def test_no_completed_requests_gives_nan_latencies():
    figures = summarize([RequestResult(ok=False, error="timeout")], 1.0, SLO())
    assert figures["completed"] == 0 and figures["output_throughput"] == 0
    assert math.isnan(figures["ttft_ms_p50"])


def test_the_schema_knows_every_figure_a_sweep_may_optimize():
    from lmstack.config.metrics import BENCH_FIGURES

    # task_score comes from the bench's scoring pass (bench.score_prompts), not the load client
    assert set(summarize([], 1.0, SLO())) | {"task_score"} == set(BENCH_FIGURES)
