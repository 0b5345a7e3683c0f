"""Model loading: resolve a folder, quantize the base, attach the adapter.

The built-in model is cached as a Hugging Face folder, so every model (built-in,
local folder, hub id, an earlier run) goes through the same from_pretrained path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import ConfigError
from lmstack.models.builtin import ensure_builtin_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    base_path: str
    trainable_params: int
    total_params: int


def resolve_base_path(model_cfg: Any, cache_dir: str) -> str:
    """The folder (or hub id) that holds the base weights and tokenizer."""
    if model_cfg.source == "builtin":
        return str(ensure_builtin_model(model_cfg.builtin, model_cfg.pretrained, cache_dir))
    path = model_cfg.name_or_path
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not (Path(path).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path: '{path}' is not a Hugging Face model folder "
            "(no config.json there)"
        )
    return str(Path(path).expanduser()) if looks_local else path


def compute_dtype(quant_cfg: Any) -> torch.dtype:
    if quant_cfg.compute_dtype != "auto":
        return DTYPES[quant_cfg.compute_dtype]
    # bfloat16 4-bit matmuls are ~30x slower than float32 on CPUs without AVX-512
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


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


def load_tokenizer(path: str, model_cfg: Any):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ConfigError(
            f"model.name_or_path: the tokenizer in '{path}' has no chat template; "
            "SFT and serving need one (add chat_template to tokenizer_config.json)"
        )
    return tokenizer


def load_base(path: str, model_cfg: Any, quant_cfg: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per tiny shard is noise; Lightning shows training

    quant = quantization_config(quant_cfg)
    dtype = compute_dtype(quant_cfg) if quant is not None else DTYPES[model_cfg.dtype]
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_cfg.revision,
        dtype=dtype,
        quantization_config=quant,
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation="sdpa",
    )
    return model


def attach_adapter(model: torch.nn.Module, adapter_cfg: Any, quantized: bool) -> torch.nn.Module:
    """Full fine-tuning (adapter=none) or a peft LoRA/DoRA adapter on a frozen base."""
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
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"adapter.target_modules: {error}") from None


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


def load_for_training(cfg: Any, cache_dir: str) -> LoadedModel:
    path = resolve_base_path(cfg.model, cache_dir)
    tokenizer = load_tokenizer(path, cfg.model)
    base = load_base(path, cfg.model, cfg.quantization)
    model = attach_adapter(base, cfg.adapter, quantized=cfg.quantization.name != "none")
    model.train()  # from_pretrained returns eval mode; adapter dropout must be live in training
    trainable, total = count_parameters(model)
    return LoadedModel(model, tokenizer, path, trainable, total)
