"""The `cost` group's schema (conf/cost/): what serving costs."""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.config.rules import require, require_choice

COST_MODES = ("hourly", "per_token")


@dataclass
class CostConfig:
    """What serving costs (conf/cost/): API prices per token, or an hourly machine price."""

    name: str = "cpu_hour"
    # hourly: usd_per_hour x measured busy time (self-hosted); per_token: API prices
    mode: str = "hourly"
    usd_per_hour: float = 0.0
    # per_token: USD per million prompt (input) and generated (output) tokens
    input_usd_per_1m: float = 0.0
    output_usd_per_1m: float = 0.0

    def __post_init__(self) -> None:
        require_choice(self.mode, COST_MODES, "cost.mode")
        for key in ("usd_per_hour", "input_usd_per_1m", "output_usd_per_1m"):
            require(getattr(self, key) >= 0, f"cost.{key}", "must be >= 0")
