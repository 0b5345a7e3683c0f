"""One LightningModule per objective, each in its own module.

An objective module provides `setup(config, loaded, rows) -> ObjectiveSetup`: it
encodes the rows its way, builds the loaders and the LightningModule. It may also
provide `load_model(config, cache_dir) -> LoadedModel` (a reward model needs a
scalar head) and `save(setup, loaded, config, run_dir)` (what the run leaves).
A new objective is one module, one schema and one YAML file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

OBJECTIVES = {
    "pretrain": "lmstack.objectives.causal_lm",
    "sft": "lmstack.objectives.causal_lm",
    "dpo": "lmstack.objectives.dpo",
    "reward": "lmstack.objectives.reward",
    "ppo": "lmstack.objectives.ppo",
    "grpo": "lmstack.objectives.grpo",
}


@dataclass
class ObjectiveSetup:
    module: Any  # the LightningModule
    train_loader: Any
    eval_loader: Any | None
    train_examples: int
    eval_examples: int
    # figures of the set-up itself (e.g. reference passes), merged into metrics.json
    metrics: dict[str, Any] = field(default_factory=dict)


def objective_module(name: str) -> ModuleType:
    if name not in OBJECTIVES:
        raise ValueError(
            f"objective.name: unknown objective '{name}' (have {', '.join(OBJECTIVES)})"
        )
    return importlib.import_module(OBJECTIVES[name])


def require_examples(train: list, origin: str, max_length: int) -> None:
    from lmstack.errors import DataError

    if not train:
        raise DataError(
            f"{origin}: no row has a target token left after tokenisation "
            f"(data.max_length={max_length} may cut off every completion)"
        )
