"""The `adapter` group's schema (conf/adapter/): full fine-tuning, LoRA, DoRA or QLoRA."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.config.rules import Choice, require


class Adapter(Choice):
    none = "none"
    lora = "lora"
    dora = "dora"
    qlora = "qlora"


ADAPTERS = tuple(Adapter)


@dataclass
class AdapterConfig:
    name: Adapter = Adapter.lora
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    use_dora: bool = False

    def __post_init__(self) -> None:
        require(self.r > 0, "adapter.r", f"rank must be positive, got {self.r}")
        require(0.0 <= self.dropout < 1.0, "adapter.dropout", f"{self.dropout} not in [0, 1)")
        if self.name != "none":
            require(len(self.target_modules) > 0, "adapter.target_modules", "is empty")
