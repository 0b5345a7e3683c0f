"""The `phase` group's schema (conf/phase/): which entry point runs, and a pipeline's stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from lmstack.config.phases import PHASES
from lmstack.config.rules import require, require_choice


@dataclass
class StageConfig:
    """One stage of phase=pipeline: a run.py invocation with these overrides.

    `{name}` in an override stands for the run directory of the earlier stage `name`,
    e.g. `model.init_from={sft}`.
    """

    name: str = MISSING
    overrides: list[str] = field(default_factory=list)


@dataclass
class PhaseConfig:
    name: str = "train"
    # phase=pipeline: the stages, run in order
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        require_choice(self.name, tuple(PHASES), "phase.name")
        if self.name == "pipeline":
            require(len(self.stages) > 0, "phase.stages", "a pipeline needs at least one stage")
        names = [stage.name for stage in self.stages]
        require(len(set(names)) == len(names), "phase.stages", f"stage names repeat: {names}")
