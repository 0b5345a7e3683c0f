"""Artifacts in ecosystem formats: a PEFT adapter folder, Hugging Face model folders.

Deferred imports, for start-up time: peft, torch and transformers (and the lmstack modules
that load them) are imported inside the functions that need them; the CLI's input checks
import this module first.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmstack.models.gguf import export_gguf

ADAPTER_CONFIG = "adapter_config.json"
LMSTACK_ADAPTER_INFO = "lmstack.json"  # lmstack's own notes next to adapter_config.json


@contextlib.contextmanager
def no_shard_bars() -> Iterator[None]:
    """transformers draws a "Writing model shards" bar per save, even for one small shard;
    lmstack's own progress lines say what is being written."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def save_model(model: Any, target: Path, **kwargs: Any) -> None:
    with no_shard_bars():
        model.save_pretrained(target, **kwargs)


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
        save_model(model, target)
    else:
        save_model(model, target, state_dict=state_dict)
    tokenizer.save_pretrained(target)
    return target


def save_merged(loaded: Any, config: Any, run_dir: Path) -> Path:
    """merged/: the adapter folded into full-precision base weights."""
    target = run_dir / "merged"
    if config.adapter.name == "none":
        save_model(loaded.model, target)
        loaded.tokenizer.save_pretrained(target)
        return target
    return merge_adapter(loaded.base_path, run_dir / "adapter", target, config.model.dtype)


def merge_adapter(base_path: str, adapter_dir: Path, target: Path, dtype: str = "float32") -> Path:
    """Fold a PEFT adapter into its base and save a Hugging Face folder with the tokenizer.

    A quantized base cannot be merged in place without rounding the update away,
    so the base is loaded unquantized here. Written to a staging folder first, so
    a killed merge never leaves a half folder that looks complete.
    """

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_model(merged, staging)
    # the adapter's tokenizer (its chat template) when it was saved with one, else the base's
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base_path).save_pretrained(
        staging
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def save_artifacts(setup: Any, loaded: Any, config: Any, run_dir: Path) -> None:
    """The adapter in PEFT format (or the full model), and a merged model and a GGUF file
    (llama.cpp's converter and quantizer, in gguf/) when asked: what a trained objective
    leaves unless it saves its own way (an objective module's `save`)."""
    adapter = config.adapter.name != "none"
    folder = save_trained(
        loaded.model,
        loaded.tokenizer,
        run_dir,
        adapter=adapter,
        state_dict=getattr(loaded, "gathered_weights", None),
    )
    if config.export.merge or config.export.gguf:
        merged = save_merged(loaded, config, run_dir)
    if adapter:
        make_portable(folder, config.model, loaded.base_path, config.paths.cache_dir)
    if config.export.gguf:
        gguf = export_gguf(merged, run_dir / "gguf", config.export.gguf, config.paths.engines_dir)
        print(f"lmstack: GGUF ({config.export.gguf}) written to {gguf}", flush=True)


def portable_base(model_cfg: Any, base_path: str, cache_dir: str) -> dict[str, str]:
    """What an adapter lmstack saves records as its base: a name that means the same model on
    another machine (the built-in's cache name, the hub id or path as given, or the earlier
    run's base), and where it was here."""
    path = Path(base_path)
    cache = Path(cache_dir).expanduser().resolve()
    if path.is_absolute() and path.parent == cache:
        name = path.name  # built-in: its cache folder's name (a hash of how it is built)
    elif model_cfg.init_from or path.name == "merged":
        name = path.parent.name + "/" + path.name  # an earlier run's model: <run id>/merged
    else:
        name = str(model_cfg.name_or_path or base_path)
    return {"base_name": name, "base_path": str(path.resolve()) if path.exists() else base_path}


def make_portable(adapter_dir: Path, model_cfg: Any, base_path: str, cache_dir: str) -> None:
    """Rewrite a saved adapter's base_model_name_or_path (peft writes the absolute path the
    base was loaded from) to its portable name, and keep lmstack's notes beside it."""
    info = portable_base(model_cfg, base_path, cache_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = info["base_name"]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter_dir / LMSTACK_ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
