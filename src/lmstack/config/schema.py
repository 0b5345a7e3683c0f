"""The root of the config: `Config`, one field per config group, and the run-level keys.

Each group's schema lives in its own module, config/groups/<group>.py (the YAML files it checks
are conf/<group>/); this module gathers them into the typed root that `launch.validate` turns
the composed config into, the keys outside any group (seed, verify, export, run, sweep, lock),
and the rules that cross groups (`Config.__post_init__`).

This module must stay light (no torch, no transformers): it is imported before
composition, and config errors must answer in about a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from lmstack.config.groups.adapter import AdapterConfig
from lmstack.config.groups.bench import BenchConfig
from lmstack.config.groups.cost import CostConfig
from lmstack.config.groups.data import DataConfig
from lmstack.config.groups.eval import EvalConfig
from lmstack.config.groups.harvest import HarvestConfig
from lmstack.config.groups.label import LabelConfig
from lmstack.config.groups.logger import LoggerConfig
from lmstack.config.groups.model import ModelConfig
from lmstack.config.groups.monitor import MonitorConfig
from lmstack.config.groups.objective import ObjectiveConfig
from lmstack.config.groups.paths import PathsConfig
from lmstack.config.groups.phase import PhaseConfig
from lmstack.config.groups.prompt import PromptConfig
from lmstack.config.groups.quantization import QuantizationConfig
from lmstack.config.groups.report import ReportConfig
from lmstack.config.groups.serving import ServingConfig
from lmstack.config.groups.trace import TraceConfig
from lmstack.config.groups.trainer import TrainerConfig
from lmstack.config.rules import Choice, require, require_choice
from lmstack.errors import ConfigError


class SweepDirection(Choice):
    auto = "auto"
    maximize = "maximize"
    minimize = "minimize"


GGUF_TYPES = ("f16", "q8_0", "q4_k_m")


@dataclass
class VerifyConfig:
    """Held-out verifier score before and after training (the demo's proof)."""

    enabled: bool = True
    num_prompts: int = 100
    max_new_tokens: int = 24
    batch_size: int = 50


@dataclass
class ExportConfig:
    merge: bool = False
    # "" | f16 | q8_0 | q4_k_m: also write gguf/model-<type>.gguf with llama.cpp's converter
    # and quantizer (for llama.cpp, Ollama, LM Studio)
    gguf: str = ""

    def __post_init__(self) -> None:
        if self.gguf:
            require_choice(self.gguf, GGUF_TYPES, "export.gguf")


@dataclass
class RunConfig:
    # train again even when the run directory holds a finished run
    rerun: bool = False
    # continue a killed run from its last checkpoint
    resume: bool = True


@dataclass
class SweepConfig:
    """What `run.py` returns to a sweeper (Optuna optimizes it; the sweep summary ranks by it)."""

    # a metrics.json key, e.g. verify/score_after or dpo/verify/score_after (a pipeline stage's);
    # "" = the phase's own: bench/<bench.metric> for bench, else the first of
    # verify/score_after, val/loss, train/loss, eval/score (a pipeline: its last stage's)
    metric: str = ""
    # maximize | minimize | auto (the direction the phase declares for the metric)
    direction: SweepDirection = SweepDirection.auto
    # the metrics.json keys summary.md's table shows, in order (empty: the sweep metric and
    # the headline figures found); summary.csv holds every metric either way
    columns: list[str] = field(default_factory=list)


@dataclass
class Config:
    phase: PhaseConfig = MISSING
    model: ModelConfig = MISSING
    adapter: AdapterConfig = MISSING
    quantization: QuantizationConfig = MISSING
    objective: ObjectiveConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    serving: ServingConfig = MISSING
    bench: BenchConfig = MISSING
    prompt: PromptConfig = MISSING
    eval: EvalConfig = MISSING
    trace: TraceConfig = MISSING
    cost: CostConfig = MISSING
    monitor: MonitorConfig = MISSING
    report: ReportConfig = MISSING
    label: LabelConfig = MISSING
    harvest: HarvestConfig = MISSING
    seed: int = 1234
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # a lock file's provenance (run id, packages, data fingerprint, code version); not read
    lock: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.phase.name == "report":
            require(
                bool(self.report.source),
                "report.source",
                "phase=report needs a trace store, run or sweep directory (report.source=PATH)",
            )
        if self.phase.name == "bench" and self.bench.feedback != "none":
            require(
                self.serving.gateway,
                "bench.feedback",
                "the scripted user rates answers through the gateway: set serving.gateway=true",
            )
        if self.phase.name == "harvest":
            require(
                bool(self.harvest.sources),
                "harvest.sources",
                "phase=harvest needs trace stores, or serve or sweep directories holding them "
                "('harvest.sources=[PATH]')",
            )
        self._check_scale_out()
        if self.adapter.name == "none" and self.quantization.name != "none":
            raise ConfigError(
                f"quantization={self.quantization.name} with adapter=none: a quantized base "
                "cannot be fully fine-tuned; pick adapter=lora, dora or qlora"
            )

    def _check_scale_out(self) -> None:
        """What a strategy needs of the rest of the config (the machine is checked later,
        before the model loads: lmstack.distributed.check_machine)."""
        trainer = self.trainer
        world = trainer.devices * trainer.num_nodes
        sharded = trainer.strategy in ("fsdp", "deepspeed_stage_3")
        if sharded and self.quantization.name != "none":
            raise ConfigError(
                f"trainer.strategy={trainer.strategy} with quantization={self.quantization.name} "
                f"(adapter={self.adapter.name}): a bitsandbytes-quantized base cannot be sharded. "
                "Use trainer.strategy=ddp (each device holds the small quantized base), or keep "
                "the strategy with adapter=lora quantization=none."
            )
        if world > 1 and self.phase.name in ("train", "pipeline"):
            require(
                self.data.batch_size % world == 0,
                "data.batch_size",
                f"{self.data.batch_size} is the global batch and must split evenly across "
                f"trainer.devices * trainer.num_nodes = {world} processes; "
                f"pick a multiple of {world}",
            )


# group name -> (schema class per option, or one schema for the whole group)
GROUP_SCHEMAS: dict[str, type] = {
    "phase": PhaseConfig,
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "quantization": QuantizationConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "paths": PathsConfig,
    "serving": ServingConfig,
    "bench": BenchConfig,
    "eval": EvalConfig,
    "prompt": PromptConfig,
    "trace": TraceConfig,
    "cost": CostConfig,
    "monitor": MonitorConfig,
    "report": ReportConfig,
    "label": LabelConfig,
    "harvest": HarvestConfig,
}
