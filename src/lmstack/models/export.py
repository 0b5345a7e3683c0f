"""Artifacts in ecosystem formats: a PEFT adapter folder, Hugging Face model folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_trained(model: Any, tokenizer: Any, run_dir: Path, adapter: bool) -> Path:
    """adapter/ (PeftModel.from_pretrained loads it) or model/ after full fine-tuning.

    The tokenizer (with its chat template) travels with it, so serving and
    evaluation use the template the model was trained with.
    """
    target = run_dir / ("adapter" if adapter else "model")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def save_merged(loaded: Any, config: Any, run_dir: Path) -> Path:
    """merged/: the adapter folded into full-precision base weights.

    A quantized base cannot be merged in place without rounding the update
    away, so the base is reloaded unquantized and the saved adapter applied.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    target = run_dir / "merged"
    if config.adapter.name == "none":
        model = loaded.model
    else:
        dtype = (
            torch.float32 if config.model.dtype == "float32" else getattr(torch, config.model.dtype)
        )
        base = AutoModelForCausalLM.from_pretrained(loaded.base_path, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    model.save_pretrained(target)
    loaded.tokenizer.save_pretrained(target)
    return target
