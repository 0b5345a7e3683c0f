"""Quality monitors computed from traces (the `monitor` config group).

Per request: does the answer have the required format (JSON, optionally matching a
JSON schema, or a regex), is it a refusal, is it empty, was it cut off at max_tokens
(finish_reason == "length"), did it miss a latency SLO. Per group: the rates.
Format and refusal checks need the answer text; under `trace.redaction=all` they
are reported as unknown (None), never as passed.

Deferred imports, for start-up time: jsonschema (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lmstack.serving.traces import REDACTED


def succeeded(row: dict[str, Any]) -> bool:
    return row["status"] < 400 and not row["error"]


def format_ok(text: str, monitor: Any) -> bool | None:
    """True/False for a checked format; None when no format is required."""
    if monitor.format == "regex":
        return re.search(monitor.format_regex, text) is not None
    if monitor.format != "json":
        return None
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    if not monitor.json_schema:
        return True
    import jsonschema

    return jsonschema.Draft202012Validator(dict(monitor.json_schema)).is_valid(value)


def check(row: dict[str, Any], monitor: Any, refusals: list[re.Pattern]) -> dict[str, Any]:
    """The monitors' verdicts on one trace row."""
    ok = succeeded(row)
    text = row.get("response") or ""
    known = ok and text != REDACTED
    latency_slo, ttft_slo, ttft = monitor.slo_latency_ms, monitor.slo_ttft_ms, row.get("ttft_ms")
    latency_breach = latency_slo is not None and row["latency_ms"] > latency_slo
    ttft_breach = ttft_slo is not None and ttft is not None and ttft > ttft_slo
    return {
        "compliant": format_ok(text, monitor) if known else None,
        "refusal": any(p.search(text) for p in refusals) if known else None,
        "empty": ok and not text.strip() and text != REDACTED,
        "truncated": ok and row.get("finish_reason") == "length",
        "slo_breach": latency_breach or ttft_breach,
        "error": not ok,
    }


def summarize(rows: list[dict[str, Any]], monitor: Any) -> dict[str, float | None]:
    """Rates over a group of trace rows (None where nothing could be checked)."""
    refusals = [re.compile(p, re.IGNORECASE) for p in monitor.refusal_patterns]
    verdicts = [check(row, monitor, refusals) for row in rows]
    return {
        "compliance": _rate(verdicts, "compliant") if monitor.format != "none" else None,
        "refusal_rate": _rate(verdicts, "refusal"),
        "empty_rate": _rate(verdicts, "empty"),
        "truncated_rate": _rate(verdicts, "truncated"),
        "slo_breach_rate": _rate(verdicts, "slo_breach"),
        "error_rate": _rate(verdicts, "error"),
    }


def _rate(verdicts: list[dict[str, Any]], key: str) -> float | None:
    known = [v[key] for v in verdicts if v[key] is not None]
    return sum(bool(v) for v in known) / len(known) if known else None
