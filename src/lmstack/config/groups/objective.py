"""The `objective` group's schemas (conf/objective/): the base every objective shares, and one
schema per objective (config/objectives.py registers them; a plug-in brings its own).

Just over 450 lines on purpose: eleven small schemas whose defaults are the only copy (the YAML
files hold comments, tests/test_defaults_once.py), kept beside the base they extend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from lmstack.config.groups.eval import JudgeConfig
from lmstack.config.rules import require, require_choice

ROLLOUT_ENGINES = ("in_process", "vllm")


# DPO's loss family by TRL 1.16's names (objectives/losses.py: DPO_LOSSES, one function each)
DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "ipo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# GRPO's variants by TRL 1.16's names (objectives/losses.py: aggregate_token_losses, ...)
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
GRPO_IS_LEVELS = ("token", "sequence")
GRPO_REWARD_SCALES = ("group", "batch", "none")
GRPO_DYNAMIC_SAMPLING = ("off", "drop", "resample")


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
    # from random weights: a higher rate, and a longer warmup while the weights are noise
    lr: float = 3e-3
    warmup_steps: int = 20


@dataclass
class SFTObjectiveConfig(ObjectiveConfig):
    name: str = "sft"
    # false: also learn the prompt tokens (plain LM loss on the whole chat)
    completion_only: bool = True


@dataclass
class DPOLossConfig(ObjectiveConfig):
    """The DPO loss family's knobs (objectives/losses.py: dpo_loss), shared by DPO on stored
    pairs and online DPO on sampled ones."""

    lr: float = 5e-4
    # strength of the pull towards the reference model (the KL weight)
    beta: float = 0.1
    # one of DPO_LOSS_TYPES, or a list of them summed with loss_weights (Any: Hydra takes
    # both `objective.loss_type=ipo` and `'objective.loss_type=[sigmoid,sft]'`)
    loss_type: Any = "sigmoid"
    # one weight per loss_type entry (default 1 each)
    loss_weights: list[float] | None = None
    # assumed share of flipped preference labels (sigmoid, robust, exo_pair, aot losses)
    label_smoothing: float = 0.0
    # DiscoPOP's temperature of the logistic/exponential mix (the paper's 0.05)
    discopop_tau: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "objective.beta", f"must be > 0, got {self.beta}")
        loss_types = self.loss_types
        require(len(loss_types) > 0, "objective.loss_type", "names no loss")
        for loss_type in loss_types:
            require_choice(str(loss_type), DPO_LOSS_TYPES, "objective.loss_type")
        if self.loss_weights is not None:
            require(
                len(self.loss_weights) == len(loss_types),
                "objective.loss_weights",
                f"has {len(self.loss_weights)} weights for the {len(loss_types)} loss types "
                f"{loss_types}; give one weight per objective.loss_type entry",
            )
        require(
            0.0 <= self.label_smoothing < 0.5,
            "objective.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        require(
            "exo_pair" not in loss_types or self.label_smoothing > 0,
            "objective.label_smoothing",
            "exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)",
        )
        require(self.discopop_tau > 0, "objective.discopop_tau", "must be > 0")

    @property
    def loss_types(self) -> list[str]:
        """`loss_type` as a list (one name, or the names of a weighted mix)."""
        given = self.loss_type
        return list(given) if isinstance(given, list | tuple) else [given]


@dataclass
class DPOObjectiveConfig(DPOLossConfig):
    name: str = "dpo"
    # reference log-probs computed once before training and cached on disk (keyed by
    # model, tokenizer and data), so a sweep over beta or loss reuses them
    precompute_ref: bool = False


@dataclass
class ORPOObjectiveConfig(ObjectiveConfig):
    """ORPO (Hong et al. 2024): SFT on the chosen answer plus an odds-ratio preference term;
    no reference model."""

    name: str = "orpo"
    lr: float = 5e-4
    # weight of the odds-ratio term against the SFT term (the paper's lambda, TRL's beta)
    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        # 0 would be plain SFT (objective=sft)
        require(self.beta > 0, "objective.beta", f"must be > 0, got {self.beta}")


# SimPO's losses (objectives/losses.py: simpo_loss)
SIMPO_LOSS_TYPES = ("simpo", "cpo")


@dataclass
class SimPOObjectiveConfig(ObjectiveConfig):
    """SimPO (Meng et al. 2024) or, with loss_type=cpo, CPO (Xu et al. 2024): preference
    losses on the policy's own log-probs; no reference model."""

    name: str = "simpo"
    lr: float = 5e-4
    # scale of the reward (the policy's token-averaged log-prob; summed for cpo)
    beta: float = 2.0
    # target reward margin gamma, as a share of beta (gamma = gamma_beta_ratio * beta; simpo)
    gamma_beta_ratio: float = 0.5
    # weight of an NLL (SFT) term on the chosen answer: CPO uses 1.0, SimPO 0.0
    cpo_alpha: float = 0.0
    loss_type: str = "simpo"
    # assumed share of flipped preference labels
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "objective.beta", f"must be > 0, got {self.beta}")
        require_choice(self.loss_type, SIMPO_LOSS_TYPES, "objective.loss_type")
        for key in ("gamma_beta_ratio", "cpo_alpha"):
            value = getattr(self, key)
            require(value >= 0, f"objective.{key}", f"must be >= 0, got {value}")
        require(
            0.0 <= self.label_smoothing < 0.5,
            "objective.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )


# KTO's losses by TRL's names (objectives/losses.py: kto_loss)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOObjectiveConfig(ObjectiveConfig):
    """KTO (Ethayarajh et al. 2024): unpaired thumbs-up/down rows against the reference."""

    name: str = "kto"
    lr: float = 5e-4
    # strength of the pull towards the reference model
    beta: float = 0.1
    # weights of desirable and undesirable rows' losses; the paper keeps
    # desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # kto, or apo_zero_unpaired (no KL reference point); TRL's names
    loss_type: str = "kto"
    # reference log-probs (of each row and of its mismatched KL pair) computed once and cached
    precompute_ref: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "objective.beta", f"must be > 0, got {self.beta}")
        for key in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, key)
            require(value > 0, f"objective.{key}", f"must be > 0, got {value}")
        require_choice(self.loss_type, KTO_LOSS_TYPES, "objective.loss_type")


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
    # the final number equals the row's answer (data.task=math: reasoning-gym's problems)
    "math",
    "format",
    "reward_model",
    # against each row's reference ("reference" or "answer"): lmstack.data.scoring
    "exact",
    "normalized",
    "numeric",
    "json_fields",
    "scorer",
    # an LLM judge's 1-10 grade of each completion, as N/10 (lmstack.judging)
    "judge",
)


@dataclass
class RewardFunctionConfig:
    """One weighted reward: verifier (the task's check of the row's answer), format (1 when
    `pattern` matches the completion), reward_model (a trained scorer at `path`), or a score
    against the row's reference: exact, normalized, numeric, json_fields, or scorer (your
    function at `scorer`, an import path `pkg.module:function`), or judge (an LLM judge's
    1-10 grade over HTTP, as N/10)."""

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
    # judge: the OpenAI-compatible judge and its rubric (single_prompt, with the row's
    # reference; rows without one are graded by conf/prompt/judge_open.yaml)
    judge: JudgeConfig | None = None

    def check(self, key: str) -> None:
        require_choice(self.name, GRPO_REWARDS, f"{key}.name")
        if self.name == "format":
            require(bool(self.pattern), f"{key}.pattern", "the format reward needs a regex")
        if self.name == "reward_model":
            require(bool(self.path), f"{key}.path", "the reward_model reward needs a run dir")
        if self.name == "scorer":
            require(bool(self.scorer), f"{key}.scorer", "give an import path pkg.module:function")
        if self.name == "judge":
            require(
                self.judge is not None and bool(self.judge.base_url),
                f"{key}.judge.base_url",
                "the judge reward needs a judge endpoint (…/v1); the model under training "
                "cannot judge itself",
            )
            self.judge.check(f"{key}.judge")


@dataclass
class SampledRewardsConfig(ObjectiveConfig):
    """What the objectives on scored on-policy samples share (GRPO, RLOO, online DPO): a group
    of completions sampled per prompt, scored by weighted reward functions."""

    lr: float = 5e-4
    # a run is a few dozen updates: a short warmup
    warmup_steps: int = 5
    # completions sampled per prompt (GRPO, RLOO: advantages are relative to the group;
    # online DPO: its best and worst make the pair)
    group_size: int = 4
    # DAPO's soft overlong punishment: the last overlong_buffer tokens of max_new_tokens ramp a
    # penalty from 0 to -overlong_penalty (0: off)
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    # where rollouts are sampled: in_process (the policy itself) or vllm (a vLLM engine that
    # gets the policy's adapter after every update; the trainer computes every log-prob)
    rollout_engine: str = "in_process"
    # a total reward that is the same for every completion in each of the first N steps stops
    # the run with an error naming the reward (0: warn only)
    reward_check_steps: int = 5
    # sampled completions saved (samples/<objective>.jsonl, a W&B table) every trainer log step
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
            f"{self.name.upper()} needs at least 2 completions per prompt, got {self.group_size}",
        )
        require(self.max_new_tokens > 0, "objective.max_new_tokens", "must be positive")
        require(
            0 <= self.overlong_buffer < self.max_new_tokens,
            "objective.overlong_buffer",
            f"must be in [0, objective.max_new_tokens={self.max_new_tokens}), "
            f"got {self.overlong_buffer}",
        )
        require(
            self.overlong_penalty >= 0,
            "objective.overlong_penalty",
            f"must be >= 0, got {self.overlong_penalty}",
        )
        require(self.temperature > 0, "objective.temperature", "must be positive")
        require(0 < self.top_p <= 1, "objective.top_p", f"must be in (0, 1], got {self.top_p}")
        require_choice(self.rollout_engine, ROLLOUT_ENGINES, "objective.rollout_engine")
        require(len(self.rewards) > 0, "objective.rewards", "is empty")
        for index, reward in enumerate(self.rewards):
            reward.check(f"objective.rewards[{index}]")


@dataclass
class GroupRolloutObjectiveConfig(SampledRewardsConfig):
    """What GRPO and RLOO share: group-relative advantages of the scored samples and a clipped
    policy ratio."""

    # weight of the KL penalty to the reference (0: no reference pass)
    beta: float = 0.04
    # the ratio is clipped to [1 - clip_eps_low, 1 + clip_eps_high] (DAPO's clip-higher: 0.28)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    # zero the loss of completions cut off at max_new_tokens (TRL's mask_truncated_completions)
    mask_truncated_completions: bool = False
    # policy updates per batch of rollouts
    iterations: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta >= 0, "objective.beta", f"must be >= 0, got {self.beta}")
        for key in ("clip_eps_low", "clip_eps_high"):
            value = getattr(self, key)
            require(value > 0, f"objective.{key}", f"must be > 0, got {value}")
        require(
            self.clip_eps_high >= self.clip_eps_low,
            "objective.clip_eps_high",
            f"must be >= objective.clip_eps_low ({self.clip_eps_low}), got {self.clip_eps_high}",
        )
        require(self.iterations >= 1, "objective.iterations", "must be >= 1")


@dataclass
class GRPOObjectiveConfig(GroupRolloutObjectiveConfig):
    """GRPO (Shao et al. 2024) and its variants, by TRL 1.16's option names."""

    name: str = "grpo"
    # token-loss averaging: grpo | dapo | dr_grpo | bnpo (see losses.aggregate_token_losses)
    loss_type: str = "dapo"
    # token | sequence (GSPO: one length-normalised ratio per completion; needs loss_type=grpo)
    importance_sampling_level: str = "token"
    # advantage divisor: group | batch (std over the batch) | none (Dr. GRPO: no std)
    scale_rewards: str = "group"
    # off | drop: train only on groups whose rewards differ (logged: train/groups_dropped) |
    # resample: and sample new prompts' groups until the batch is full of such groups (DAPO)
    dynamic_sampling: str = "off"
    # resample: at most this many extra batches of prompts sampled per update; then it trains
    # on what it has (logged: train/resample_bound_hit)
    max_resample_rounds: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice(self.loss_type, GRPO_LOSS_TYPES, "objective.loss_type")
        require_choice(
            self.importance_sampling_level, GRPO_IS_LEVELS, "objective.importance_sampling_level"
        )
        require_choice(self.scale_rewards, GRPO_REWARD_SCALES, "objective.scale_rewards")
        require_choice(self.dynamic_sampling, GRPO_DYNAMIC_SAMPLING, "objective.dynamic_sampling")
        require(
            self.max_resample_rounds >= 1,
            "objective.max_resample_rounds",
            f"must be >= 1 (dynamic_sampling=drop samples no more), got {self.max_resample_rounds}",
        )
        # GSPO optimises a per-sequence objective; a token-summed loss would weight each
        # sequence's single ratio by its length (TRL warns; here it is refused)
        require(
            self.importance_sampling_level == "token" or self.loss_type == "grpo",
            "objective.importance_sampling_level",
            f"'sequence' (GSPO) needs objective.loss_type=grpo (per-sequence mean), got "
            f"'{self.loss_type}', which weights each sequence's one ratio by its token count",
        )


@dataclass
class RLOOObjectiveConfig(GroupRolloutObjectiveConfig):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): GRPO's rollouts, each sample's baseline
    the mean reward of its siblings, the KL to the reference in the reward."""

    name: str = "rloo"
    beta: float = 0.05


@dataclass
class OnlineDPOObjectiveConfig(SampledRewardsConfig, DPOLossConfig):
    """Online DPO (Guo et al. 2024): each step, completions sampled on-policy per prompt and
    scored by the reward functions; the best and worst of a prompt's group are a pair for the
    DPO loss family (DPOLossConfig) against the reference. Equal rewards: no pair."""

    name: str = "online_dpo"
    # two completions a prompt, as the paper and TRL; more: the best against the worst of the
    # group (Yuan et al. 2024, Self-Rewarding LMs), fewer ties, more sampling
    group_size: int = 2
