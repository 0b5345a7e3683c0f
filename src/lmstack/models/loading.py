"""Model loading: resolve a folder, quantize the base, attach the adapter.

The built-in model is cached as a Hugging Face folder, so every model (built-in,
local folder, hub id, an earlier run) goes through the same from_pretrained path.

Deferred imports, for start-up time: bitsandbytes, peft and transformers (and the lmstack
modules that load them) are imported inside the functions that need them; the CLI's input
checks import this module first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmstack.config.objectives import OBJECTIVES
from lmstack.errors import ConfigError
from lmstack.models import attention
from lmstack.models.adapters import (
    ADAPTER_CONFIG,
    adapter_base,
    is_adapter_folder,
    merged_adapter,
)
from lmstack.models.builtin import ensure_builtin_model, file_lock
from lmstack.models.cpu_dtype import compute_dtype_4bit, probe_note
from lmstack.models.export import merge_adapter
from lmstack.models.from_gguf import ensure_gguf_model, require_causal_lm
from lmstack.tracking.identity import file_fingerprint
from lmstack.tracking.run_dir import read_json

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    base_path: str
    trainable_params: int
    total_params: int
    # the trained weights gathered from the ranks of a sharded (FSDP/DeepSpeed) run, for saving
    gathered_weights: dict[str, Any] | None = None


def resolve_base_path(model_cfg: Any, cache_dir: str) -> str:
    """The folder (or hub id) that holds the base weights and tokenizer."""
    base = getattr(model_cfg, "base", None)
    from_adapter = model_cfg.init_from and not is_run_dir(model_cfg.init_from)
    if from_adapter and is_adapter_folder(model_cfg.init_from):
        return str(merged_adapter(model_cfg.init_from, base, cache_dir, "model.init_from"))
    if model_cfg.init_from:
        return str(model_from_run(Path(model_cfg.init_from), cache_dir))
    if model_cfg.source == "builtin":
        return str(ensure_builtin_model(model_cfg.builtin, model_cfg.pretrained, cache_dir))
    if model_cfg.source == "gguf":
        return str(ensure_gguf_model(model_cfg.path, cache_dir))
    path = model_cfg.name_or_path
    if is_adapter_folder(path):
        return str(merged_adapter(path, base, cache_dir, "model.name_or_path"))
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not (Path(path).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path: '{path}' is not a Hugging Face model folder "
            "(no config.json there)"
        )
    return str(Path(path).expanduser()) if looks_local else path


def is_run_dir(path: str | Path) -> bool:
    return (Path(str(path)).expanduser() / "status.json").is_file()


def model_from_run(run_dir: Path, cache_dir: str | None = None) -> Path:
    """The model an earlier run produced, as a Hugging Face folder with that run's tokenizer
    and chat template: its merged/ or model/ folder, or its adapter merged on first use into
    the cache (`<cache_dir>/merged_runs/<run>-<adapter hash>/merged`; no cache_dir: the
    configured default, $LMSTACK_CACHE_DIR or .cache/lmstack): the run's own folder is never
    written to unasked (a merged real model is hundreds of MB).

    Merging (rather than training the same adapter on) keeps the reference model of
    DPO, PPO and GRPO right: with a fresh adapter on the merged weights, "adapter
    disabled" is the earlier run's model, not the original base.
    """

    status = read_json(run_dir / "status.json")
    if status is None:
        raise ConfigError(
            f"model.init_from: '{run_dir}' is neither an lmstack run directory (status.json) "
            f"nor a PEFT adapter folder ({ADAPTER_CONFIG}); pass one of them"
        )
    if status.get("status") != "finished":
        raise ConfigError(
            f"model.init_from: the run in '{run_dir}' has not finished "
            f"(status: {status.get('status')})"
        )
    if (run_dir / "reward_model.json").exists():
        raise ConfigError(
            f"model.init_from: '{run_dir}' is a reward-model run; "
            "pass it as objective.reward_model instead"
        )
    for name in ("merged", "model"):
        if (run_dir / name / "config.json").is_file():
            return run_dir / name
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"model.init_from: '{run_dir}' holds no adapter/, model/ or merged/")
    base_path = adapter_base(adapter, None, str(cache_root(cache_dir)), "model.init_from")
    target = merged_cache_dir(run_dir, adapter, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / "merge.lock"):
        if not (target / "config.json").is_file():
            print(f"lmstack: merging the adapter of {run_dir} into its base ({target})", flush=True)
            merge_adapter(base_path, adapter, target)
    return target


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("LMSTACK_CACHE_DIR", ".cache/lmstack")).expanduser()


def merged_cache_dir(run_dir: Path, adapter: Path, cache_dir: str | None) -> Path:
    """Where a run's merged model is cached: keyed by the adapter's weights, so a re-trained
    run merges again."""

    weights = sorted(adapter.glob("adapter_model.*"))
    key = file_fingerprint(weights[0]) if weights else "none"
    return cache_root(cache_dir) / "merged_runs" / f"{run_dir.resolve().name}-{key}" / "merged"


def compute_dtype(quant_cfg: Any) -> torch.dtype:
    if quant_cfg.compute_dtype != "auto":
        return DTYPES[quant_cfg.compute_dtype]
    # bfloat16 4-bit matmuls are ~30x slower than float32 on CPUs without AVX-512 bf16 and
    # faster with it: measured once per CPU (models/cpu_dtype.py)
    return compute_dtype_4bit()


def quantization_config(quant_cfg: Any):
    if quant_cfg.name == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant_cfg.name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(quant_cfg),
    )


def load_tokenizer(path: str, model_cfg: Any, chat_template: str | None = None):
    """The model's tokenizer; ``chat_template`` (data.chat_template: a .jinja file or the
    template text) gives it a template when it has none, or replaces its own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
        check_chat_template(tokenizer, chat_template)
    if tokenizer.chat_template is None:
        source = f"{path}/tokenizer_config.json" if Path(path).is_dir() else path
        raise ConfigError(
            f"{model_key(model_cfg)}: the tokenizer in '{source}' has no chat template, and "
            "SFT, preference training and serving render chats with it; give one with "
            "data.chat_template=<file.jinja or the template text> (e.g. a ChatML template), "
            "or add chat_template to tokenizer_config.json"
        )
    return tokenizer


def model_key(model_cfg: Any) -> str:
    """The config key that names where a model comes from (for messages)."""
    if getattr(model_cfg, "init_from", None):
        return "model.init_from"
    return {"gguf": "model.path", "builtin": "model"}.get(model_cfg.source, "model.name_or_path")


def read_chat_template(value: str) -> str:
    """data.chat_template: a file's text when it names one, else the template itself."""
    looks_like_file = "{" not in value
    if looks_like_file:
        file = Path(value).expanduser()
        if not file.is_file():
            raise ConfigError(
                f"data.chat_template: no file '{value}' (give a .jinja file or the template "
                'text, e.g. "{% for m in messages %}...{% endfor %}")'
            )
        return file.read_text(encoding="utf-8")
    return value


def check_chat_template(tokenizer: Any, value: str) -> None:
    """A template that cannot render a short chat fails now, by its key and file, not mid-run."""
    chat = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    origin = "the template text" if "{" in value else f"'{value}'"
    try:
        tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as error:  # jinja raises several types for a broken template
        raise ConfigError(
            f"data.chat_template: {origin} does not render a chat ({type(error).__name__}: "
            f"{error}); fix it: it must render a list of {{role, content}} messages"
        ) from None


def load_base(
    path: str, model_cfg: Any, quant_cfg: Any, auto_class: Any = None, **model_kwargs: Any
) -> torch.nn.Module:
    """The base weights through `auto_class` (AutoModelForCausalLM unless told otherwise,
    e.g. AutoModelForSequenceClassification with ``num_labels=1`` for a reward model)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per tiny shard is noise; Lightning shows training

    quant = quantization_config(quant_cfg)
    dtype = compute_dtype(quant_cfg) if quant is not None else DTYPES[model_cfg.dtype]
    if quant is not None:
        auto = quant_cfg.compute_dtype == "auto"
        print(
            f"lmstack: 4-bit compute dtype {str(dtype).removeprefix('torch.')} "
            f"(quantization.compute_dtype={quant_cfg.compute_dtype}"
            f"{probe_note() if auto else ''})",
            flush=True,
        )
    load = partial(
        (auto_class or AutoModelForCausalLM).from_pretrained,
        path,
        revision=model_cfg.revision,
        dtype=dtype,
        quantization_config=quant,
        trust_remote_code=model_cfg.trust_remote_code,
        **model_kwargs,
    )
    try:
        # SDPA per sequence on packed rows (models/attention.py), SDPA itself otherwise
        return load(attn_implementation=attention.register())
    except ValueError:  # an architecture that takes no custom attention function
        return load(attn_implementation="sdpa")


def require_causal_lm_folder(path: str, model_cfg: Any) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    source = f"{path}/config.json" if Path(path).is_dir() else path
    require_causal_lm(config, f"{model_key(model_cfg)}: '{source}'")


def attach_adapter(
    model: torch.nn.Module, adapter_cfg: Any, quantized: bool, task_type: str = "CAUSAL_LM"
) -> torch.nn.Module:
    """Full fine-tuning (adapter=none) or a peft LoRA/DoRA adapter on a frozen base.

    ``task_type="SEQ_CLS"`` also trains (and saves with the adapter) the score head.
    """
    if adapter_cfg.name == "none":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # casts norms to float32 and enables input grads; no gradient checkpointing on tiny models
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=list(adapter_cfg.target_modules),
        use_dora=adapter_cfg.use_dora or adapter_cfg.name == "dora",
        task_type=task_type,
        bias="none",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"adapter.target_modules: {error}") from None
    if quantized:
        keep_4bit_layers_differentiable(model)
    return model


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """Keep every 4-bit layer of a model that trains on bitsandbytes' differentiable path.

    On a CPU with AVX-512 bf16, bitsandbytes (0.49+) repacks a Linear4bit's weight for
    its fast inference kernel the first time the layer runs in eval mode without
    gradients (a validation or verifier pass). That kernel has no backward: afterwards
    the layer gives its input no gradient, so every adapter below it stops learning,
    silently. Undoing the repack is lossy (the scales pass through bfloat16), so a
    training model never takes it; one repacked already is restored once.
    """
    import bitsandbytes as bnb
    from bitsandbytes import functional

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as their logical element count."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if hasattr(param, "quant_state") and param.quant_state is not None:
            count = int(torch.Size(param.quant_state.shape).numel())
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def wants_gradient_checkpointing(cfg: Any) -> bool:
    """trainer.gradient_checkpointing (a train run's preflight has set a null one from the
    memory plan), or, where no plan could be made, the objective's default."""
    choice = getattr(getattr(cfg, "trainer", None), "gradient_checkpointing", None)
    if choice is None:
        spec = OBJECTIVES.get(getattr(getattr(cfg, "objective", None), "name", ""))
        return bool(spec and spec.checkpointed_by_default)
    return bool(choice)


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing (works with frozen inputs, as under LoRA, without forcing
    input gradients), through the name this transformers has: `activation_checkpointing_enable`
    where it exists (the old name then warns that it is deprecated), else the old one."""
    kwargs = {"use_reentrant": False}
    if enable := getattr(model, "activation_checkpointing_enable", None):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_for_training(cfg: Any, cache_dir: str) -> LoadedModel:
    path = resolve_base_path(cfg.model, cache_dir)
    require_causal_lm_folder(path, cfg.model)
    tokenizer = load_tokenizer(
        path, cfg.model, getattr(getattr(cfg, "data", None), "chat_template", None)
    )
    base = load_base(path, cfg.model, cfg.quantization)
    model = attach_adapter(base, cfg.adapter, quantized=cfg.quantization.name != "none")
    if wants_gradient_checkpointing(cfg):
        enable_activation_checkpointing(model)
    model.train()  # from_pretrained returns eval mode; adapter dropout must be live in training
    trainable, total = count_parameters(model)
    return LoadedModel(model, tokenizer, path, trainable, total)
