"""The `report` group's schema (conf/report/): phase=report's source and outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.config.rules import require_choice

REPORT_FORMATS = ("md", "csv")


@dataclass
class ReportConfig:
    """phase=report: a summary of a trace store, a run directory or a sweep directory."""

    name: str = "default"
    # a traces.sqlite file, or a run or sweep directory holding them (required for the phase)
    source: str = ""
    # count bench warm-up requests too
    include_warmup: bool = False
    formats: list[str] = field(default_factory=lambda: ["md", "csv"])
    plots: bool = True

    def __post_init__(self) -> None:
        for index, fmt in enumerate(self.formats):
            require_choice(fmt, REPORT_FORMATS, f"report.formats[{index}]")
