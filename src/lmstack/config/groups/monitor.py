"""The `monitor` group's schema (conf/monitor/): quality checks computed from traces."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lmstack.config.rules import require, require_choice
from lmstack.errors import ConfigError

MONITOR_FORMATS = ("none", "json", "regex")


@dataclass
class MonitorConfig:
    """Quality checks computed from traces (conf/monitor/)."""

    name: str = "default"
    # the answer format required: none, json (optionally matching json_schema) or regex
    format: str = "none"
    format_regex: str = ""
    json_schema: dict[str, Any] = field(default_factory=dict)
    # an answer matching any of these (case-insensitive regexes) counts as a refusal; the
    # patterns themselves are conf/monitor/default.yaml's (every monitor option builds on it)
    refusal_patterns: list[str] = field(default_factory=list)
    # latency service-level objectives in milliseconds; null = not checked
    slo_latency_ms: float | None = None
    slo_ttft_ms: float | None = None

    def __post_init__(self) -> None:
        require_choice(self.format, MONITOR_FORMATS, "monitor.format")
        if self.format == "regex":
            require(bool(self.format_regex), "monitor.format_regex", "format=regex needs one")
        for key, pattern in [("format_regex", self.format_regex)] + [
            (f"refusal_patterns[{i}]", p) for i, p in enumerate(self.refusal_patterns)
        ]:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(f"monitor.{key}: '{pattern}' is not a regex ({error})") from None
