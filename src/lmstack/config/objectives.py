"""The objective plug-in registry: what lmstack knows about each objective before any of its
code is imported. Its schema (validated at composition), the data formats it trains on, the
rows it takes from the built-in task, whether it checkpoints activations by default, and the
module that implements it (`OBJECTIVE = Objective(setup=...)`).

Adding an objective is one module that calls `register_objective` (a built-in one is listed
below), one schema and one YAML file (`conf/objective/NAME.yaml` opening with
`defaults: [NAME_schema, _self_]`); docs/architecture.md has the recipe. A module outside
lmstack is imported before composition when LMSTACK_PLUGINS names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.config.groups.objective import (
    DPOObjectiveConfig,
    GRPOObjectiveConfig,
    KTOObjectiveConfig,
    ObjectiveConfig,
    OnlineDPOObjectiveConfig,
    ORPOObjectiveConfig,
    PPOObjectiveConfig,
    PretrainObjectiveConfig,
    RewardObjectiveConfig,
    RLOOObjectiveConfig,
    SFTObjectiveConfig,
    SimPOObjectiveConfig,
)


@dataclass(frozen=True)
class ObjectiveTraits:
    """What an objective holds in memory besides the policy, for the memory plan
    (models/memory.py), which reads these and never an objective's name."""

    # a frozen reference policy: full fine-tuning keeps a copy of the weights (with an adapter,
    # the base with the adapter off is the reference)
    reference_model: bool = False
    # objective.precompute_ref=true replaces that copy with log-probs computed before training
    precomputable_reference: bool = False
    # samples completions while training: a KV cache of max_new_tokens more a sequence, and
    # objective.group_size sequences a prompt
    rollouts: bool = False
    # each distinct prompt runs once and its group's completions read its KV cache
    # (lmstack.objectives.rollout), so a step's tokens count the prompt once
    shared_prompts: bool = False
    # a reward model of the policy's size and a value head beside it (PPO)
    reward_model_and_value_head: bool = False


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    schema: type[ObjectiveConfig]
    module: str  # defines OBJECTIVE = lmstack.objectives.Objective(setup=..., ...)
    # data formats (data/sources.py FORMAT_FIELDS) it trains on, in order of preference
    row_formats: tuple[str, ...]
    # recompute activations in the backward pass unless trainer.gradient_checkpointing says
    checkpointed_by_default: bool = False
    traits: ObjectiveTraits = ObjectiveTraits()

    @property
    def builtin_format(self) -> str:
        """The format of the rows it gets from the built-in task: its first choice."""
        return self.row_formats[0]


@dataclass(frozen=True)
class Objective:
    """The three steps of a training run that an objective implements; None: the default
    (lmstack.objectives.load_objective fills it in: the base with its adapter; the adapter
    or model, merged when asked). Declared here, light, so a plug-in module can register and
    declare itself before composition without importing torch."""

    setup: Callable[[Any, Any, Any], Any]  # (config, loaded, rows) -> ObjectiveSetup
    load_model: Callable[[Any, str], Any] | None = None  # (config, cache_dir) -> LoadedModel
    save: Callable[[Any, Any, Any, Path], None] | None = None  # (setup, loaded, config, run_dir)


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    if not issubclass(spec.schema, ObjectiveConfig):
        raise TypeError(f"objective {spec.name}: its schema must subclass ObjectiveConfig")
    OBJECTIVES[spec.name] = spec
    return spec


def objective_traits(name: str) -> ObjectiveTraits:
    """A registered objective's traits; an unknown one holds nothing beside the policy."""
    spec = OBJECTIVES.get(name)
    return spec.traits if spec is not None else ObjectiveTraits()


# the traits the built-in objectives share
SAMPLED = ObjectiveTraits(reference_model=True, rollouts=True)
GROUP_SAMPLED = ObjectiveTraits(reference_model=True, rollouts=True, shared_prompts=True)


def objective_schemas() -> dict[str, type[ObjectiveConfig]]:
    return {name: spec.schema for name, spec in OBJECTIVES.items()}


for _spec in (
    ObjectiveSpec(
        "pretrain",
        PretrainObjectiveConfig,
        "lmstack.objectives.causal_lm",
        ("text", "prompt_completion", "messages"),
    ),
    ObjectiveSpec(
        "sft",
        SFTObjectiveConfig,
        "lmstack.objectives.causal_lm",
        ("prompt_completion", "messages", "preference"),
    ),
    # two sequences (chosen and rejected) per example make activations the memory limit
    ObjectiveSpec(
        "dpo",
        DPOObjectiveConfig,
        "lmstack.objectives.dpo",
        ("preference",),
        True,
        ObjectiveTraits(reference_model=True, precomputable_reference=True),
    ),
    # reference-free pairwise objectives: two sequences an example, as DPO, no reference pass
    ObjectiveSpec("orpo", ORPOObjectiveConfig, "lmstack.objectives.orpo", ("preference",), True),
    ObjectiveSpec("simpo", SimPOObjectiveConfig, "lmstack.objectives.simpo", ("preference",), True),
    # unpaired thumbs-up/down rows; preference pairs become one row of each
    ObjectiveSpec(
        "kto",
        KTOObjectiveConfig,
        "lmstack.objectives.kto",
        ("preference", "unpaired_preference"),
        traits=ObjectiveTraits(reference_model=True, precomputable_reference=True),
    ),
    ObjectiveSpec("reward", RewardObjectiveConfig, "lmstack.objectives.reward", ("preference",)),
    ObjectiveSpec(
        "ppo",
        PPOObjectiveConfig,
        "lmstack.objectives.ppo",
        ("prompt",),
        traits=ObjectiveTraits(
            reference_model=True, rollouts=True, reward_model_and_value_head=True
        ),
    ),
    # group_size sampled sequences a prompt: each distinct prompt runs once and its key/value
    # cache serves the group's completions (lmstack.objectives.rollout), which cuts the
    # activations more than checkpointing would (and checkpointed layers cannot read a
    # cache): not checkpointed by default, unlike TRL's GRPOConfig and RLOOConfig; on
    # SmolLM2-135M GRPO peaked at 0.81x GRPOTrainer's RSS so (docs/benchmarks.md)
    ObjectiveSpec(
        "grpo", GRPOObjectiveConfig, "lmstack.objectives.grpo", ("prompt",), traits=GROUP_SAMPLED
    ),
    ObjectiveSpec(
        "rloo", RLOOObjectiveConfig, "lmstack.objectives.rloo", ("prompt",), traits=GROUP_SAMPLED
    ),
    # prompts only: the pairs are sampled on-policy each step and ranked by the rewards
    ObjectiveSpec(
        "online_dpo",
        OnlineDPOObjectiveConfig,
        "lmstack.objectives.online_dpo",
        ("prompt",),
        True,
        SAMPLED,
    ),
):
    register_objective(_spec)
