"""The `trace` group's schema (conf/trace/): what the tracing gateway records and where."""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.config.rules import require, require_choice

TRACE_REDACTIONS = ("none", "prompts", "all")


@dataclass
class TraceConfig:
    """What the tracing gateway records and where (conf/trace/)."""

    name: str = "sqlite"
    # the SQLite trace store; empty = traces.sqlite in the serve or bench run's directory
    path: str = ""
    # none: keep prompts and answers; prompts: leave prompts out; all: leave both out
    redaction: str = "none"
    # seconds between retries while the store cannot be written (traces stay buffered)
    retry_s: float = 2.0
    # also export OpenTelemetry spans (GenAI conventions) to this OTLP/HTTP URL (…/v1/traces)
    otlp_endpoint: str = ""

    def __post_init__(self) -> None:
        require_choice(self.redaction, TRACE_REDACTIONS, "trace.redaction")
        require(self.retry_s > 0, "trace.retry_s", f"must be > 0, got {self.retry_s}")
