"""What serving cost, from traces and the `cost` config group.

Two models: an external API billed per token (`mode: per_token`, USD per million
input and output tokens), or a self-hosted engine billed by the hour (`mode: hourly`,
a GPU- or CPU-hour price times the measured busy time: the wall time during which at
least one request was in flight). Hourly cost is shared among requests in proportion
to the time each was in flight, so concurrent requests split the hours they share.

The bench and eval phases call `cost_metrics(run_dir / "traces.sqlite", config.cost)`
on their own trace store; the report calls `request_costs` per group of traces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.serving.traces import TRACE_DB_NAME, read_traces


def busy_seconds(rows: list[dict[str, Any]]) -> float:
    """Length of the union of the requests' [start, end] intervals."""
    intervals = sorted((row["time"], row["time"] + row["latency_ms"] / 1000) for row in rows)
    total, current_start, current_end = 0.0, None, None
    for start, end in intervals:
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def request_costs(rows: list[dict[str, Any]], cost: Any) -> list[float]:
    """USD per request, in row order."""
    if cost.mode == "per_token":
        return [
            (row.get("prompt_tokens") or 0) * cost.input_usd_per_1m / 1e6
            + (row.get("completion_tokens") or 0) * cost.output_usd_per_1m / 1e6
            for row in rows
        ]
    total = busy_seconds(rows) / 3600 * cost.usd_per_hour
    in_flight = [max(row["latency_ms"], 0.0) for row in rows]
    weight = sum(in_flight)
    if weight <= 0:
        return [total / len(rows) if rows else 0.0 for _ in rows]
    return [total * share / weight for share in in_flight]


def summarize(rows: list[dict[str, Any]], cost: Any) -> dict[str, float]:
    """Totals over trace rows: "cost/usd_total", "cost/usd_per_request", per 1k tokens."""
    costs = request_costs(rows, cost)
    total = float(sum(costs))
    output_tokens = sum(row.get("completion_tokens") or 0 for row in rows)
    return {
        "cost/usd_total": total,
        "cost/usd_per_request": total / len(rows) if rows else 0.0,
        "cost/usd_per_1k_output_tokens": total / output_tokens * 1000 if output_tokens else 0.0,
        "cost/busy_s": busy_seconds(rows),
    }


def cost_metrics(trace_db: str | Path, cost: Any, include_warmup: bool = False) -> dict[str, float]:
    """`summarize` on a trace store's rows (what a bench or eval run adds to its metrics)."""

    return summarize(read_traces(trace_db, include_warmup=include_warmup), cost)


def hourly_cost(seconds: float, cost: Any) -> float:
    """An hourly-priced run without traces (gateway off): price x wall time."""
    return seconds / 3600 * cost.usd_per_hour if cost.mode == "hourly" else 0.0


def from_counts(
    cost: Any, seconds: float, requests: int, prompt_tokens: int, output_tokens: int
) -> dict[str, float]:
    """Cost figures from a run's own counts (no traces: the gateway was off)."""
    if cost.mode == "per_token":
        total = prompt_tokens * cost.input_usd_per_1m / 1e6
        total += output_tokens * cost.output_usd_per_1m / 1e6
    else:
        total = hourly_cost(seconds, cost)
    return {
        "cost/usd_total": total,
        "cost/usd_per_request": total / requests if requests else 0.0,
        "cost/usd_per_1k_output_tokens": total / output_tokens * 1000 if output_tokens else 0.0,
        "cost/busy_s": seconds,
    }


def phase_costs(
    config: Any,
    run_dir: Path,
    seconds: float,
    requests: int,
    prompt_tokens: int,
    output_tokens: int,
) -> dict[str, float]:
    """Cost figures for a bench or eval run: from the traces its gateway left in its run
    directory, else (gateway off, or a store shared with other jobs) from its own counts."""

    db = Path(run_dir) / TRACE_DB_NAME
    trace = getattr(config, "trace", None)
    if db.is_file() and not (trace is not None and trace.path):
        try:
            return cost_metrics(db, config.cost)
        except DataError:
            pass  # an unreadable store: the counts below still price the run
    return from_counts(config.cost, seconds, requests, prompt_tokens, output_tokens)
