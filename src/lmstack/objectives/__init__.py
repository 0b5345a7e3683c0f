"""One LightningModule per objective; `build_objective` picks it by `objective.name`."""

from __future__ import annotations

from typing import Any


def build_objective(config: Any, model: Any, total_steps: int):
    name = config.objective.name
    if name in ("pretrain", "sft"):
        from lmstack.objectives.causal_lm import CausalLMModule

        return CausalLMModule(model, config.objective, total_steps)
    if name == "dpo":
        from lmstack.objectives.dpo import DPOModule

        return DPOModule(model, config.objective, total_steps)
    raise ValueError(f"objective.name: unknown objective '{name}'")
