"""The memory plan: what one device will hold while training, before any model is loaded.

Per device, in bytes (Rajbhandari et al. 2020 for the states, Korthikanti et al. 2022 for
activations; REFERENCES.md "Scale and memory"):

- weights: N x bytes(dtype); under quantization the decoder's linear weights take 4 bits
  (nf4, + one float32 scale per 64) or 8 bits (int8, + a scale per row), the rest stays in dtype
- trainable adapter weights (float32), their gradients (x1) and AdamW's two moments (x2);
  full fine-tuning: gradients and moments of all N weights
- activations saved for the backward pass, per token of the step: A_layer per decoder layer
  (or only the layer's input with gradient checkpointing, plus one layer recomputed), and the
  LM head's logits with their gradient (tokens x vocab x 4 bytes, LOGIT_COPIES times)
- the reference model (DPO, KTO, PPO, GRPO after full fine-tuning: a frozen copy; with an adapter
  the policy with its adapter off, no copy), the reward model (PPO), the value head (PPO)
- the rollout KV cache (PPO, GRPO): 2 x layers x kv width x (prompt + new tokens) per sample

Sharding: fsdp FULL_SHARD and deepspeed_stage_3 divide weights, gradients and optimizer
states by the world size; SHARD_GRAD_OP and deepspeed_stage_2 divide gradients and states;
ddp replicates everything. Activations are per device: the device's share of the batch.

The activation and logit constants were measured on this code (float32 and bf16-mixed on
CPU, allocations traced by torch's profiler, tests/memory_probe.py) and hold for the
Llama-architecture models lmstack trains; the tests compare the whole estimate with the
measured peak.

Light: no torch, no transformers (a refusal answers in about a second).

Deferred imports, for start-up time: tokenizers and torch (and the lmstack modules that load
them) are imported inside the functions that need them; the CLI's input checks import this
module first. psutil is imported where used: it comes with another dependency, not with
lmstack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.config.objectives import OBJECTIVES, objective_traits
from lmstack.models.builtin import builtin_folder, llama_config_fields
from lmstack.models.from_gguf import gguf_folder, resolve_gguf_file
from lmstack.models.next_token import LOGIT_CHUNK_ELEMENTS

GB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# saved activations of one decoder layer, per token, in elements: c_d per hidden unit and
# c_i per MLP unit (norms, q/k/v after rotary, attention output, gate/up/act/product)
ACT_PER_HIDDEN = 10
ACT_PER_INTERMEDIATE = 3
# the LM head at each token, in float32-sized copies of tokens x vocab: the logits and their
# gradient (the loss upcasts one row at a time, objectives/losses.py). Measured on SmolLM2 at
# 4,096 tokens a step: 1.2 copies at float32, 1.5 at bf16-mixed (bf16 logits, float32 rows)
LOGIT_COPIES = 1.5
# bytes a saved activation takes: under bf16-mixed (and 16-mixed) autocast keeps the matmuls'
# inputs in 16 bits but the norms and the residual stream in float32 (measured on SmolLM2: 0.66
# of float32's); 16-true precisions keep everything in 16 bits
ACTIVATION_BYTES = {"mixed": 2.75, "true": 2}
# With trainer.gradient_checkpointing=null, a run recomputes its activations in the backward
# pass (~30% more compute) when keeping them would take more than this and more than all else
# the step holds: SmolLM2-135M SFT on chat rows at batch 8 (~1,300 tokens a step) would keep
# 1.5 GB at float32 (1.0 GB at bf16-mixed) against 0.9 GB for weights, logits and states;
# a 21M-parameter model on benchmarks/sft.py's chat rows keeps 0.37 GB against 0.09 GB, and its peak
# then passed TRL's (which checkpoints: glibc keeps freed activation memory, docs/benchmarks.md
# "Findings"). Below it (the demo model keeps 36 MB) the memory saved is not worth the time;
# TRL's SFT default checkpoints always.
CHECKPOINT_ABOVE = GB // 4


@dataclass
class ModelShape:
    """A Llama-architecture decoder's dimensions (config.json's keys)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            intermediate_size=config["intermediate_size"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one decoder layer."""
        d, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, i),
            "up_proj": (d, i),
            "down_proj": (i, d),
        }

    def linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.module_dims().values())

    def other_params(self) -> int:
        """Embeddings, LM head and norms: never quantized by bitsandbytes here."""
        heads = 1 if self.tied_embeddings else 2
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return heads * self.vocab_size * self.hidden_size + norms

    def total_params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, rank: int, targets: list[str]) -> int:
        dims = self.module_dims()
        per_layer = sum(rank * (dims[t][0] + dims[t][1]) for t in targets if t in dims)
        return self.num_layers * per_layer

    def layer_activation_elements(self) -> int:
        return ACT_PER_HIDDEN * self.hidden_size + ACT_PER_INTERMEDIATE * self.intermediate_size


@dataclass
class MemoryPlan:
    terms: dict[str, int]  # name -> bytes per device
    notes: dict[str, str]  # name -> how it was counted
    device_bytes: int | None
    device_source: str
    world: int
    tokens_per_step: int
    shrink: dict[str, str] = field(default_factory=dict)  # term -> keys that shrink it
    checkpointing: bool = False  # activations recomputed in the backward pass
    checkpointing_reason: str = ""

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def biggest(self) -> str:
        return max(self.terms, key=self.terms.get)

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.total <= self.device_bytes

    def table(self) -> str:
        width = max(len(name) for name in self.terms)
        lines = [
            f"lmstack: memory plan per device ({self.world} device(s), "
            f"{self.tokens_per_step} tokens a step each)"
        ]
        for name, size in sorted(self.terms.items(), key=lambda item: -item[1]):
            lines.append(f"  {name:<{width}}  {_gb(size):>10}  {self.notes.get(name, '')}")
        lines.append(f"  {'total':<{width}}  {_gb(self.total):>10}")
        if self.device_bytes is not None:
            lines.append(
                f"  {'device':<{width}}  {_gb(self.device_bytes):>10}  {self.device_source}"
            )
        return "\n".join(lines)

    def checkpointing_line(self) -> str:
        state = "on" if self.checkpointing else "off"
        return f"lmstack: gradient checkpointing {state}: {self.checkpointing_reason}"

    def refusal(self) -> str:
        biggest = self.biggest
        return (
            f"the memory plan needs {_gb(self.total)} per device and the device has "
            f"{_gb(self.device_bytes or 0)} ({self.device_source}); the biggest term is "
            f"{biggest} ({_gb(self.terms[biggest])}). Shrink it with {self.shrink[biggest]}, "
            "or see every term with phase=plan (trainer.memory_check=false runs anyway)."
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "terms_bytes": self.terms,
            "total_bytes": self.total,
            "device_bytes": self.device_bytes,
            "device_source": self.device_source,
            "fits": self.fits,
            "biggest": self.biggest,
            "world": self.world,
            "tokens_per_step": self.tokens_per_step,
            "gradient_checkpointing": self.checkpointing,
            "gradient_checkpointing_reason": self.checkpointing_reason,
        }


def _gb(size: int) -> str:
    return f"{size / GB:.3f} GB" if size >= 0.01 * GB else f"{size / 1024**2:.1f} MB"


SHRINK = {
    "weights": "quantization=nf4 adapter=qlora, model.dtype=bfloat16, or trainer.strategy=fsdp "
    "(shards them over trainer.devices)",
    "reference model": "an adapter (adapter=lora: the reference is the base, no copy) or "
    "objective.precompute_ref=true (dpo, kto)",
    "reward model": "a smaller reward model (objective.reward_model) or model.dtype=bfloat16",
    "adapter weights": "adapter.r or adapter.target_modules",
    "gradients": "adapter=lora (only the adapter is trained) or trainer.strategy=fsdp",
    "optimizer states": "adapter=lora (only the adapter is trained) or trainer.strategy=fsdp",
    "activations": "data.batch_size, data.max_length, trainer.gradient_checkpointing=true, or more "
    "trainer.devices (the global batch is split)",
    "logits": "data.batch_size or data.max_length (tokens a step), or more trainer.devices",
    "rollout kv cache": "data.batch_size, objective.max_new_tokens or objective.group_size",
    "value head": "nothing: it is one vector",
}


def model_shape(config: Any, cache_dir: str) -> ModelShape | None:
    """The shape from the config (built-in) or the folder's config.json; None when it cannot be
    read without downloading (a hub id) or loading (an earlier run)."""
    model = config.model
    if model.init_from:
        run_dir = Path(model.init_from)
        for folder in ("merged", "model"):
            if (run_dir / folder / "config.json").is_file():
                return _read_shape(run_dir / folder / "config.json")
        return None
    if model.source == "builtin":
        return ModelShape.from_hf_config(llama_config_fields(model.builtin))
    path = model_folder(model, cache_dir) / "config.json"
    return _read_shape(path) if path.is_file() else None


def model_folder(model: Any, cache_dir: str) -> Path:
    """The folder (or hub id) of a model=hf or model=gguf base; a GGUF's converted folder
    exists once the first run has converted it."""
    if model.source == "gguf":
        return gguf_folder(resolve_gguf_file(model.path), cache_dir)
    return Path(model.name_or_path).expanduser()


def _read_shape(path: Path) -> ModelShape | None:
    try:
        return ModelShape.from_hf_config(json.loads(path.read_text()))
    except (KeyError, json.JSONDecodeError):
        return None


def weight_bytes(shape: ModelShape, dtype: str, quantization: Any) -> int:
    dense = DTYPE_BYTES[dtype]
    linear, other = shape.linear_params(), shape.other_params()
    if quantization.name == "nf4":
        # 4 bits a weight + a float32 absmax per 64 (double quant: 8 bits + a scale per 256)
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if quantization.double_quant else 4 / 64)
        return int(linear * per_weight + other * dense)
    if quantization.name == "int8":
        return int(linear * 1 + other * dense)
    return (linear + other) * dense


def plan_memory(
    config: Any,
    shape: ModelShape,
    tokens_per_step: int,
    device_bytes: int | None,
    device_source: str,
) -> MemoryPlan:
    """Every term per device for this config; `tokens_per_step`: one device's tokens a step
    (every sequence of its share of the batch, both sides of each preference pair)."""
    trainer, adapter = config.trainer, config.adapter
    traits = objective_traits(config.objective.name)
    world = trainer.devices * trainer.num_nodes
    strategy = trainer.strategy
    shards_states = strategy in ("fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
    if strategy == "fsdp" and trainer.fsdp.sharding_strategy == "NO_SHARD":
        shards_states = False
    shards_weights = strategy == "deepspeed_stage_3" or (
        strategy == "fsdp" and trainer.fsdp.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
    )
    states_div = world if shards_states else 1
    weights_div = world if shards_weights else 1
    dense = DTYPE_BYTES[config.model.dtype]

    terms: dict[str, int] = {}
    notes: dict[str, str] = {}
    weights = weight_bytes(shape, config.model.dtype, config.quantization)
    terms["weights"] = weights // weights_div
    notes["weights"] = (
        f"{shape.total_params() / 1e6:.1f}M params, {config.model.dtype}, "
        f"quantization={config.quantization.name}"
        + (f", / {world} ranks" if weights_div > 1 else "")
    )
    if adapter.name == "none":
        trainable, train_bytes = shape.total_params(), dense
    else:
        trainable, train_bytes = shape.lora_params(adapter.r, list(adapter.target_modules)), 4
        if adapter.name == "dora" or adapter.use_dora:
            trainable += shape.num_layers * sum(
                shape.module_dims()[t][1]
                for t in adapter.target_modules
                if t in shape.module_dims()
            )
        terms["adapter weights"] = trainable * 4
        notes["adapter weights"] = f"{trainable / 1e6:.2f}M float32 (adapter={adapter.name})"
    terms["gradients"] = trainable * train_bytes // states_div
    notes["gradients"] = f"{trainable / 1e6:.2f}M trainable"
    terms["optimizer states"] = 2 * trainable * train_bytes // states_div
    notes["optimizer states"] = "AdamW: two moments a trainable weight"

    logit_tokens = tokens_per_step
    if not traits.rollouts:  # sampled completions' log-probs are not chunked
        logit_tokens = min(tokens_per_step, LOGIT_CHUNK_ELEMENTS // shape.vocab_size)
    terms["logits"] = int(logit_tokens * shape.vocab_size * 4 * LOGIT_COPIES)
    notes["logits"] = f"{logit_tokens} tokens x vocab {shape.vocab_size} x float32 x {LOGIT_COPIES}"
    if logit_tokens < tokens_per_step:
        notes["logits"] += f" (a chunk of {tokens_per_step} tokens at a time)"

    if traits.reference_model and adapter.name == "none":
        precomputed = traits.precomputable_reference and config.objective.precompute_ref
        if not precomputed:
            terms["reference model"] = weights // weights_div
            notes["reference model"] = (
                "a frozen copy (full fine-tuning has no adapter to switch off)"
            )
    if traits.reward_model_and_value_head:
        terms["reward model"] = shape.total_params() * dense
        notes["reward model"] = "assumed the policy's size (objective.reward_model)"
        terms["value head"] = (shape.hidden_size + 1) * 4 * 4
        notes["value head"] = "weights, gradient and AdamW moments"
    if traits.rollouts:
        samples = config.data.batch_size // world * getattr(config.objective, "group_size", 1)
        length = config.data.max_length + config.objective.max_new_tokens
        kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dense
        terms["rollout kv cache"] = samples * length * kv
        notes["rollout kv cache"] = f"{samples} samples x {length} tokens"
    kept = saved_activation_bytes(config, shape, tokens_per_step, checkpointing=False)
    checkpointing, why = checkpointing_choice(config, kept, sum(terms.values()), device_bytes)
    terms["activations"] = (
        saved_activation_bytes(config, shape, tokens_per_step, checkpointing=True)
        if checkpointing
        else kept
    )
    notes["activations"] = f"{tokens_per_step} tokens x {shape.num_layers} layers" + (
        ", gradient checkpointing" if checkpointing else ""
    )
    return MemoryPlan(
        terms=terms,
        notes=notes,
        device_bytes=device_bytes,
        device_source=device_source,
        world=world,
        tokens_per_step=tokens_per_step,
        shrink={name: SHRINK[name] for name in terms},
        checkpointing=checkpointing,
        checkpointing_reason=why,
    )


def saved_activation_bytes(
    config: Any, shape: ModelShape, tokens_per_step: int, checkpointing: bool
) -> int:
    precision = config.trainer.precision
    act_bytes = 4
    if precision.startswith(("bf16", "16")):
        act_bytes = ACTIVATION_BYTES["true" if precision.endswith("true") else "mixed"]
    per_layer = shape.layer_activation_elements() * act_bytes
    if checkpointing:
        # each layer keeps its input; backward recomputes one layer at a time
        return int(tokens_per_step * (shape.num_layers * shape.hidden_size * act_bytes + per_layer))
    return int(tokens_per_step * shape.num_layers * per_layer)


def checkpointing_choice(
    config: Any, kept: int, rest: int, device_bytes: int | None
) -> tuple[bool, str]:
    """Whether the run recomputes activations in its backward pass, and why.
    `kept`: the activations a step keeps without recomputing; `rest`: every other term.
    trainer.gradient_checkpointing when set; else on for an objective that checkpoints by
    default (dpo), for a run that would not fit the device otherwise, and where activations
    would be most of the step's memory (over CHECKPOINT_ABOVE and over all else together)."""
    choice = config.trainer.gradient_checkpointing
    if choice is not None:
        return bool(choice), f"trainer.gradient_checkpointing={str(bool(choice)).lower()}"
    spec = OBJECTIVES.get(config.objective.name)
    if spec is not None and spec.checkpointed_by_default:
        return True, f"the default for objective={config.objective.name}"
    if device_bytes is not None and kept + rest > device_bytes:
        return True, (
            f"without it the plan needs {_gb(kept + rest)}, more than the device's "
            f"{_gb(device_bytes)}"
        )
    if kept > CHECKPOINT_ABOVE and kept > rest:
        return True, (
            f"the activations kept for the backward pass would take {_gb(kept)}, more than "
            f"{_gb(CHECKPOINT_ABOVE)} and than the rest of the plan ({_gb(rest)})"
        )
    return False, (
        f"the activations kept for the backward pass take {_gb(kept)} "
        f"(the rest of the plan: {_gb(rest)})"
    )


# tokens a chat template adds around a row's text (the built-in template adds 4)
TEMPLATE_TOKENS = 6


def tokens_per_step(rows: Any, config: Any, tokenizer_file: Path | None) -> int:
    """One device's tokens in its largest step: its share of the global batch, times the
    sequences of each example (2 for a preference pair, group_size completions for grpo), at
    the 90th-percentile length (packed) or the longest (padded rows)."""
    world = config.trainer.devices * config.trainer.num_nodes
    per_device = max(1, min(config.data.batch_size, len(rows.train)) // world)
    lengths = sorted(_sequence_lengths(rows, config, tokenizer_file))
    if not lengths:
        return per_device * config.data.max_length
    traits = objective_traits(config.objective.name)
    if traits.rollouts:
        new_tokens = config.objective.max_new_tokens
        samples = getattr(config.objective, "group_size", 1)
        if traits.shared_prompts:
            # each prompt runs once, its cache read by the group (lmstack.objectives.rollout)
            return per_device * (lengths[-1] + samples * new_tokens)
        return per_device * samples * (lengths[-1] + new_tokens)
    length = lengths[int(0.9 * (len(lengths) - 1))] if config.data.packing else lengths[-1]
    # kto scores each unpaired row and a mismatched KL pair of it
    sequences = 2 if rows.format in ("preference", "unpaired_preference") else 1
    return per_device * sequences * length


def _sequence_lengths(rows: Any, config: Any, tokenizer_file: Path | None) -> list[int]:
    encode = _token_counter(tokenizer_file)
    cap = config.data.max_length
    prompts_only = objective_traits(config.objective.name).rollouts
    lengths = []
    for row in rows.train[:500]:
        if rows.format == "preference":
            text = f"{_text(row.get('prompt', ''))} {_text(row.get('chosen', ''))}"
            text = max(
                text, f"{_text(row.get('prompt', ''))} {_text(row.get('rejected', ''))}", key=len
            )
        elif prompts_only:
            text = _text(row.get("prompt", row.get("messages", "")))
        else:
            text = _text(row)
        lengths.append(min(cap, encode(text) + TEMPLATE_TOKENS))
    return lengths


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(_text(v) for k, v in value.items() if k not in ("answer", "role"))
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    return ""


def _token_counter(tokenizer_file: Path | None):
    """The model's own tokenizer (tokenizer.json, without transformers), else ~4 chars a token."""
    if tokenizer_file is not None and tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
    return lambda text: max(1, len(text) // 4)


def tokenizer_file(config: Any, cache_dir: str) -> Path | None:
    """The base model's tokenizer.json, when it is on disk already."""
    model = config.model
    if model.init_from:
        return Path(model.init_from) / "tokenizer" / "tokenizer.json"
    if model.source == "builtin":
        return builtin_folder(model.builtin, model.pretrained, cache_dir) / "tokenizer.json"
    return model_folder(model, cache_dir) / "tokenizer.json"


def device_memory(config: Any) -> tuple[int, str]:
    """One device's memory: trainer.device_memory_gb, a CUDA GPU's, or this machine's RAM
    shared by the processes of a node."""
    trainer = config.trainer
    if trainer.device_memory_gb is not None:
        return int(trainer.device_memory_gb * GB), "trainer.device_memory_gb"
    if trainer.accelerator != "cpu":
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory, f"detected: {props.name}"
    import psutil

    ram = psutil.virtual_memory().total
    share = f", / {trainer.devices} processes" if trainer.devices > 1 else ""
    return ram // trainer.devices, f"detected: this machine's RAM{share}"


def memory_plan(config: Any, rows: Any, cache_dir: str) -> MemoryPlan | None:
    """The plan for this run (None when the model's shape cannot be read before loading)."""
    shape = model_shape(config, cache_dir)
    if shape is None:
        return None
    tokens = tokens_per_step(rows, config, tokenizer_file(config, cache_dir))
    device_bytes, source = device_memory(config)
    return plan_memory(config, shape, tokens, device_bytes, source)
