"""One LightningModule per objective, each in its own module.

An objective module declares `OBJECTIVE = Objective(setup=...)`: `setup(config, loaded, rows)
-> ObjectiveSetup` encodes the rows its way and builds the loaders and the LightningModule;
`load_model(config, cache_dir) -> LoadedModel` (default: the base with its adapter; a reward
model needs a scalar head) and `save(setup, loaded, config, run_dir)` (default: the adapter or
model, merged when asked) are the other two steps of a training run. What lmstack knows before
importing it (schema, row formats, checkpointing default) is its ObjectiveSpec in
config/objectives.py. A new objective is one module, one schema and one YAML file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any

from lmstack.config.objectives import OBJECTIVES, Objective
from lmstack.errors import ConfigError, DataError
from lmstack.models.export import save_artifacts
from lmstack.models.loading import load_for_training


@dataclass
class ObjectiveSetup:
    module: Any  # the LightningModule
    train_loader: Any
    eval_loader: Any | None
    train_examples: int
    eval_examples: int
    # figures of the set-up itself (e.g. reference passes), merged into metrics.json
    metrics: dict[str, Any] = field(default_factory=dict)


def load_objective(name: str) -> Objective:
    """The implementation of a registered objective (its module imported now: torch et al.)."""
    if name not in OBJECTIVES:
        raise ConfigError(
            f"objective.name: unknown objective '{name}' (have {', '.join(OBJECTIVES)})"
        )
    module = importlib.import_module(OBJECTIVES[name].module)
    objective = getattr(module, "OBJECTIVE", None)
    if not isinstance(objective, Objective):
        raise TypeError(f"{module.__name__} declares no OBJECTIVE = Objective(setup=...)")
    return replace(
        objective,
        load_model=objective.load_model or load_for_training,
        save=objective.save or save_artifacts,
    )


def require_examples(train: list, origin: str, max_length: int) -> None:
    if not train:
        raise DataError(
            f"{origin}: no row has a target token left after tokenisation "
            f"(data.max_length={max_length} may cut off every completion)"
        )
