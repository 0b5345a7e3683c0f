"""The `objective` group's schemas (conf/objective/): the base every objective shares, and one
schema per objective (config/objectives.py registers them; a plug-in brings its own)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from lmstack.config.rules import require, require_choice

ROLLOUT_ENGINES = ("in_process", "vllm")


# same tuple as lmstack.objectives.losses.DPO_LOSS_TYPES, repeated so this module stays torch-free
DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo")


@dataclass
class ObjectiveConfig:
    name: str = MISSING
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self) -> None:
        require(self.lr > 0, "objective.lr", f"must be positive, got {self.lr}")
        require(self.warmup_steps >= 0, "objective.warmup_steps", "must be >= 0")


@dataclass
class PretrainObjectiveConfig(ObjectiveConfig):
    name: str = "pretrain"


@dataclass
class SFTObjectiveConfig(ObjectiveConfig):
    name: str = "sft"
    # false: also learn the prompt tokens (plain LM loss on the whole chat)
    completion_only: bool = True


@dataclass
class DPOObjectiveConfig(ObjectiveConfig):
    name: str = "dpo"
    lr: float = 5e-4
    # strength of the pull towards the reference model (the KL weight)
    beta: float = 0.1
    loss: str = "sigmoid"
    # assumed share of flipped preference labels (sigmoid and robust losses)
    label_smoothing: float = 0.0
    # reference log-probs computed once before training and cached on disk (keyed by
    # model, tokenizer and data), so a sweep over beta or loss reuses them
    precompute_ref: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "objective.beta", f"must be > 0, got {self.beta}")
        require_choice(self.loss, DPO_LOSS_TYPES, "objective.loss")
        require(
            0.0 <= self.label_smoothing < 0.5,
            "objective.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )


@dataclass
class RewardObjectiveConfig(ObjectiveConfig):
    """A Bradley-Terry reward model: a scalar head scored on preference pairs."""

    name: str = "reward"
    lr: float = 1e-3


@dataclass
class PPOObjectiveConfig(ObjectiveConfig):
    """PPO-RLHF (Ouyang et al. 2022) against a reward-model run."""

    name: str = "ppo"
    lr: float = 5e-4
    # a finished objective=reward run directory (required)
    reward_model: str | None = None
    # weight of the per-token KL penalty to the reference
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    # optimisation passes over each batch of rollouts
    ppo_epochs: int = 2
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    # where rollouts are sampled: in_process (the policy itself) or vllm (a vLLM engine that
    # gets the policy's adapter after every update; the trainer computes every log-prob)
    rollout_engine: str = "in_process"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            bool(self.reward_model),
            "objective.reward_model",
            "ppo needs a reward-model run directory (objective.reward_model=<run dir>)",
        )
        require(self.kl_coef > 0, "objective.kl_coef", f"must be > 0, got {self.kl_coef}")
        require(0 <= self.gamma <= 1, "objective.gamma", f"must be in [0, 1], got {self.gamma}")
        require(0 <= self.lam <= 1, "objective.lam", f"must be in [0, 1], got {self.lam}")
        for key in ("clip_eps", "value_clip_eps", "vf_coef", "temperature"):
            value = getattr(self, key)
            require(value > 0, f"objective.{key}", f"must be > 0, got {value}")
        require(self.ppo_epochs >= 1, "objective.ppo_epochs", "must be >= 1")
        require(self.max_new_tokens > 0, "objective.max_new_tokens", "must be positive")
        require(0 < self.top_p <= 1, "objective.top_p", f"must be in (0, 1], got {self.top_p}")
        require_choice(self.rollout_engine, ROLLOUT_ENGINES, "objective.rollout_engine")


# reward functions objective=grpo can sum (see lmstack.objectives.reward_functions)
GRPO_REWARDS = (
    "verifier",
    "format",
    "reward_model",
    # against each row's reference ("reference" or "answer"): lmstack.data.scoring
    "exact",
    "normalized",
    "numeric",
    "json_fields",
    "scorer",
)


@dataclass
class RewardFunctionConfig:
    """One weighted reward: verifier (the task's check of the row's answer), format (1 when
    `pattern` matches the completion), reward_model (a trained scorer at `path`), or a score
    against the row's reference: exact, normalized, numeric, json_fields, or scorer (your
    function at `scorer`, an import path `pkg.module:function`)."""

    name: str = MISSING
    weight: float = 1.0
    pattern: str | None = None
    path: str | None = None
    # json_fields: the keys compared (empty = every key of the reference)
    fields: list[str] = field(default_factory=list)
    # numeric: |answer - reference| <= tolerance * max(1, |reference|)
    tolerance: float = 1e-6
    # scorer: `pkg.module:function` taking (completion, reference, row) -> number
    scorer: str | None = None

    def check(self, key: str) -> None:
        require_choice(self.name, GRPO_REWARDS, f"{key}.name")
        if self.name == "format":
            require(bool(self.pattern), f"{key}.pattern", "the format reward needs a regex")
        if self.name == "reward_model":
            require(bool(self.path), f"{key}.path", "the reward_model reward needs a run dir")
        if self.name == "scorer":
            require(bool(self.scorer), f"{key}.scorer", "give an import path pkg.module:function")


@dataclass
class GRPOObjectiveConfig(ObjectiveConfig):
    name: str = "grpo"
    lr: float = 5e-4
    # completions sampled per prompt; advantages are relative to the group
    group_size: int = 4
    # weight of the KL penalty to the reference (0: no reference pass)
    beta: float = 0.04
    clip_eps: float = 0.2
    # policy updates per batch of rollouts
    iterations: int = 1
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    # where rollouts are sampled: in_process (the policy itself) or vllm (a vLLM engine that
    # gets the policy's adapter after every update; the trainer computes every log-prob)
    rollout_engine: str = "in_process"
    # a total reward that is the same for every completion in each of the first N steps stops
    # the run with an error naming the reward (0: warn only)
    reward_check_steps: int = 5
    # sampled completions saved (samples/grpo.jsonl, a W&B table) every trainer log step
    samples_per_log: int = 4
    rewards: list[RewardFunctionConfig] = field(
        default_factory=lambda: [
            RewardFunctionConfig(name="verifier", weight=1.0),
            RewardFunctionConfig(name="format", weight=0.1, pattern=r"answer is -?\d+"),
        ]
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.group_size >= 2,
            "objective.group_size",
            f"GRPO needs at least 2 completions per prompt, got {self.group_size}",
        )
        require(self.beta >= 0, "objective.beta", f"must be >= 0, got {self.beta}")
        require(self.clip_eps > 0, "objective.clip_eps", f"must be > 0, got {self.clip_eps}")
        require(self.iterations >= 1, "objective.iterations", "must be >= 1")
        require(self.max_new_tokens > 0, "objective.max_new_tokens", "must be positive")
        require(self.temperature > 0, "objective.temperature", "must be positive")
        require(0 < self.top_p <= 1, "objective.top_p", f"must be in (0, 1], got {self.top_p}")
        require_choice(self.rollout_engine, ROLLOUT_ENGINES, "objective.rollout_engine")
        require(len(self.rewards) > 0, "objective.rewards", "is empty")
        for index, reward in enumerate(self.rewards):
            reward.check(f"objective.rewards[{index}]")
