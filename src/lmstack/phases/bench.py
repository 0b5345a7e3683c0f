"""phase=bench: measure a served model the way `vllm bench serve` does.

Reads top to bottom: build the prompt set → start the engine (or reach the
external URL) → warm it up → send the requests (Poisson arrivals or a fixed
concurrency, streamed) → figures (TTFT, TPOT, ITL, latency, throughput, goodput)
→ metrics.json, requests.jsonl, W&B and a table. The engine is always stopped.

Deferred imports, for start-up time: numpy, openai and tqdm (and the lmstack modules that
load them) are imported inside the functions that need them; the CLI's input checks import
this module first.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmstack.data import arith
from lmstack.data.arith import problems
from lmstack.data.package_files import resolve_path
from lmstack.errors import ConfigError, DataError
from lmstack.phases.context import RunContext
from lmstack.prompts import prompt_version, render_messages, render_text
from lmstack.serving.costs import phase_costs
from lmstack.serving.traces import WARMUP_TAG
from lmstack.tracking.loggers import log_results
from lmstack.tracking.run_dir import previous_results, set_status, write_json

TABLE_KEYS = (
    "completed",
    "failed",
    "request_throughput",
    "output_throughput",
    "goodput",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "itl_ms_p50",
    "e2el_ms_p50",
    "e2el_ms_p99",
)
# request fields a prompt-file row may set for itself
ROW_REQUEST_FIELDS = ("max_tokens", "temperature", "stop")


def run(ctx: RunContext) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from lmstack.serving.client import run_load, run_stoppable
    from lmstack.serving.engines import serve
    from lmstack.serving.scripted_user import give_feedback

    config, run_dir = ctx.config, ctx.run_dir
    done = previous_results(run_dir, config.run.rerun, "benchmark", print_table)
    if done is not None:
        return done
    bench = config.bench
    requests, answers = build_requests(bench, config.prompt)
    settings = load_settings(bench, prompt_version(config.prompt))
    with serve(config, ctx.cache_dir, run_dir) as endpoint:
        print(f"lmstack: benchmarking {endpoint.model} at {endpoint.base_url}", flush=True)
        warm_up(requests[: bench.warmup_requests], endpoint, settings)
        with tqdm(total=len(requests[bench.warmup_requests :]), desc="bench", unit="req") as bar:
            results, duration = run_stoppable(
                run_load(requests[bench.warmup_requests :], endpoint, settings, progress=bar)
            )
        metrics = bench_metrics(results, duration, bench, endpoint, settings.prompt_version)
        if bench.feedback != "none":
            metrics |= give_feedback(results, answers[bench.warmup_requests :], endpoint, bench)
        metrics |= task_score(endpoint, config)
    metrics |= bench_costs(config, run_dir, metrics)  # after serve(): the traces are written
    write_requests(run_dir / "requests.jsonl", results)
    write_json(run_dir / "metrics.json", metrics)
    log_bench(ctx, metrics)
    set_status(run_dir, "finished")
    print_table(metrics)
    return metrics


def build_requests(bench: Any, prompt: Any) -> tuple[list[dict[str, Any]], list[str | None]]:
    """Warm-up requests plus `num_requests` measured ones: chat `messages` or a `prompt`;
    and each one's reference answer (the built-in task's, or a row's "answer"; else None),
    which the scripted user's `correct` rule checks."""

    count = bench.warmup_requests + bench.num_requests
    rows = builtin_rows(count, bench.seed) if bench.prompts == "builtin" else jsonl_rows(bench)
    if not rows:
        raise DataError(f"bench.prompts: {bench.prompts} holds no prompts")
    rows = [rows[i % len(rows)] for i in range(count)]  # cycle a short file
    answers = [None if row.get("answer") is None else str(row["answer"]) for row in rows]
    requests = []
    for row in rows:
        # a row may set its own output length etc., as serving datasets do
        request = {key: row[key] for key in ROW_REQUEST_FIELDS if key in row}
        request.update(row.get("request") or {})  # any other body fields, sent as they are
        if "messages" in row:
            request["messages"] = row["messages"]
        elif bench.endpoint == "chat":
            request["messages"] = render_messages(prompt, {"question": row["prompt"]})
        else:
            request["prompt"] = render_text(prompt, {"question": row["prompt"]})
        requests.append(request)
    return requests, answers


def builtin_rows(count: int, seed: int) -> list[dict[str, Any]]:
    return [
        {"prompt": p.question, "answer": p.answer} for p in problems(count, seed, held_out=True)
    ]


def jsonl_rows(bench: Any) -> list[dict[str, Any]]:
    """Rows of {"prompt": str} or {"messages": [...]}; a bad line is named by file:line."""
    path = resolve_path(bench.prompts, "bench.prompts")
    if not path.is_file():
        raise ConfigError(f"bench.prompts: '{path}' is not a file (or 'builtin')")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not ({"prompt", "messages"} & set(row)):
            raise DataError(f"{where}: a bench row needs a 'prompt' or a 'messages' field")
        if "messages" in row and bench.endpoint == "completions":
            raise DataError(f"{where}: 'messages' rows need bench.endpoint=chat")
        rows.append(row)
    return rows


def load_settings(bench: Any, version: str) -> Any:
    from lmstack.serving.client import LoadSettings

    return LoadSettings(
        max_tokens=bench.max_tokens,
        temperature=bench.temperature,
        max_concurrency=bench.max_concurrency,
        request_rate=bench.request_rate,
        endpoint=bench.endpoint,
        ignore_eos=bench.ignore_eos,
        timeout_s=bench.request_timeout_s,
        seed=bench.seed,
        prompt_version=version,
        users=bench.users,
    )


def warm_up(requests: list[dict[str, Any]], endpoint: Any, settings: Any) -> None:
    """Unmeasured requests first: the engine's first forward passes are slow (allocation,
    kernel selection), and would otherwise land in the first measured requests."""

    from lmstack.serving.client import run_load, run_stoppable

    if requests:
        run_stoppable(run_load(requests, endpoint, replace(settings, tag=WARMUP_TAG)))


def bench_metrics(
    results: list[Any], duration: float, bench: Any, endpoint: Any, version: str
) -> dict[str, Any]:
    from lmstack.serving.metrics import SLO, failure_reasons, summarize

    slo = SLO(bench.slo_ttft_ms, bench.slo_tpot_ms, bench.slo_e2el_ms)
    figures = summarize(results, duration, slo)
    metrics: dict[str, Any] = {f"bench/{key}": value for key, value in figures.items()}
    metrics["bench/failure_reasons"] = failure_reasons(results)
    metrics["bench/engine"] = endpoint.engine
    metrics["bench/model"] = endpoint.model
    metrics["bench/served"] = endpoint.served
    metrics["bench/prompt_version"] = version
    return metrics


def task_score(endpoint: Any, config: Any) -> dict[str, Any]:
    """The built-in task's verifier score of greedy answers from the benchmarked endpoint,
    so a sweep over engines and quantizations shows what speed costs in quality."""
    count = config.bench.score_prompts
    if not count:
        return {}
    from lmstack.evaluation.target import Sampling, ServedTarget

    problems = arith.problems(count, seed=0, held_out=True)  # phase=eval's held-out problems
    sampling = Sampling(max_new_tokens=32, temperature=0.0, top_p=1.0, seed=0, batch_size=count)
    target = ServedTarget(
        endpoint.base_url, endpoint.model, config.prompt, True, sampling, api_key=endpoint.api_key
    )
    answers = target.answers([{"question": p.question} for p in problems])
    scores = [arith.verify(row[0], p.answer) for p, row in zip(problems, answers, strict=True)]
    return {"bench/task_score": sum(scores) / len(scores), "bench/task_score_n": len(scores)}


def bench_costs(config: Any, run_dir: Path, metrics: dict[str, Any]) -> dict[str, float]:
    """cost/usd_total, cost/usd_per_request, ... from the gateway's traces (or the counts)."""

    return phase_costs(
        config,
        run_dir,
        seconds=metrics["bench/duration_s"],
        requests=metrics["bench/completed"],
        prompt_tokens=metrics["bench/prompt_tokens"],
        output_tokens=metrics["bench/output_tokens"],
    )


def write_requests(path: Path, results: list[Any]) -> None:
    with open(path, "w") as handle:
        for index, result in enumerate(results):
            handle.write(json.dumps({"index": index, **result.record()}) + "\n")


def log_bench(ctx: RunContext, metrics: dict[str, Any]) -> None:
    row = {key: metrics.get(f"bench/{key}") for key in TABLE_KEYS}
    log_results(ctx, metrics, tables={"bench/table": [row]})


def print_table(metrics: dict[str, Any]) -> None:
    width = max(len(key) for key in TABLE_KEYS)
    print("lmstack: bench results")
    for key in (*TABLE_KEYS, *(["task_score"] if "bench/task_score" in metrics else [])):
        value = metrics.get(f"bench/{key}")
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")
    if reasons := metrics.get("bench/failure_reasons"):
        print("  failures:")
        for reason, count in reasons.items():
            print(f"    {count} x {reason}")
