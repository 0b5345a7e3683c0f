"""Artifacts in ecosystem formats: a PEFT adapter folder, Hugging Face model folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_trained(
    model: Any, tokenizer: Any, run_dir: Path, adapter: bool, state_dict: Any = None
) -> Path:
    """adapter/ (PeftModel.from_pretrained loads it) or model/ after full fine-tuning.

    The tokenizer (with its chat template) travels with it, so serving and
    evaluation use the template the model was trained with. `state_dict`: the weights
    gathered from the ranks of a sharded (FSDP) run, where `model` holds only a shard.
    """
    target = run_dir / ("adapter" if adapter else "model")
    if state_dict is None:
        model.save_pretrained(target)
    else:
        model.save_pretrained(target, state_dict=state_dict)
    tokenizer.save_pretrained(target)
    return target


def save_merged(loaded: Any, config: Any, run_dir: Path) -> Path:
    """merged/: the adapter folded into full-precision base weights."""
    target = run_dir / "merged"
    if config.adapter.name == "none":
        loaded.model.save_pretrained(target)
        loaded.tokenizer.save_pretrained(target)
        return target
    return merge_adapter(loaded.base_path, run_dir / "adapter", target, config.model.dtype)


def merge_adapter(base_path: str, adapter_dir: Path, target: Path, dtype: str = "float32") -> Path:
    """Fold a PEFT adapter into its base and save a Hugging Face folder with the tokenizer.

    A quantized base cannot be merged in place without rounding the update away,
    so the base is loaded unquantized here. Written to a staging folder first, so
    a killed merge never leaves a half folder that looks complete.
    """
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def save_artifacts(setup: Any, loaded: Any, config: Any, run_dir: Path) -> None:
    """The adapter in PEFT format (or the full model), and a merged model and a GGUF file
    (llama.cpp's converter and quantizer, in gguf/) when asked: what a trained objective
    leaves unless it saves its own way (an objective module's `save`)."""
    save_trained(
        loaded.model,
        loaded.tokenizer,
        run_dir,
        adapter=config.adapter.name != "none",
        state_dict=getattr(loaded, "gathered_weights", None),
    )
    if config.export.merge or config.export.gguf:
        merged = save_merged(loaded, config, run_dir)
    if config.export.gguf:
        from lmstack.models.gguf import export_gguf

        gguf = export_gguf(merged, run_dir / "gguf", config.export.gguf, config.paths.engines_dir)
        print(f"lmstack: GGUF ({config.export.gguf}) written to {gguf}", flush=True)
