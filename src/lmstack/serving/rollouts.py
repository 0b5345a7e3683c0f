"""Rollouts on a vLLM engine (objective.rollout_engine=vllm) for GRPO and PPO.

lmstack starts vLLM (from its own environment, as `serving=vllm` does) on the policy's base
with LoRA on and runtime adapter loading allowed (VLLM_ALLOW_RUNTIME_LORA_UPDATING), samples
each rollout batch there through /v1/completions (prompt token ids in, completion token ids
out), and after every policy update saves the adapter and loads it under a new name
(/v1/load_lora_adapter; the previous one is unloaded), so every rollout is on-policy. The
trainer computes every log-prob itself: the engine only proposes tokens.

Deferred imports, for start-up time: openai (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import torch

from lmstack.config.groups.serving import VllmServingConfig
from lmstack.errors import ConfigError
from lmstack.serving.engine_vllm import lora_rank_size
from lmstack.serving.processes import EngineError

# the base vLLM serves is not quantized: a QLoRA policy would roll out off-policy
ADAPTERS_VLLM_LOADS = ("lora",)
REQUEST_TIMEOUT_S = 600.0


class VllmRollouts:
    """The policy's current adapter on a running vLLM engine."""

    def __init__(self, base_url: str, adapter_dir: Path, pad_token_id: int, eos_token_id: int):
        self.base_url = base_url.rstrip("/")
        self.adapter_dir = adapter_dir
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.version = 0
        self.name = "policy-0"
        self.client = httpx.Client(timeout=REQUEST_TIMEOUT_S)
        self.generated_tokens = 0

    def sample(
        self,
        batch: dict[str, Any],
        num_samples: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
    ) -> torch.Tensor:
        """``(B * num_samples, max_new_tokens)`` completion ids as `sample_completions` gives
        them: prompt ``b``'s samples in consecutive rows, padded with the pad token."""
        prompts = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        body = {
            "model": self.name,
            "prompt": prompts,
            "n": num_samples,
            "max_tokens": max_new_tokens,
            "temperature": 0.0 if greedy else temperature,
            "top_p": 1.0 if greedy else top_p,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        answer = self.client.post(f"{self.base_url}/completions", json=body)
        if answer.status_code != 200:
            raise EngineError(f"rollout engine: HTTP {answer.status_code}: {answer.text[:500]}")
        choices = sorted(answer.json()["choices"], key=lambda choice: choice["index"])
        rows = []
        for choice in choices:
            tokens = list(choice["token_ids"])[:max_new_tokens]
            ended = choice.get("finish_reason") == "stop"
            if ended and (not tokens or tokens[-1] != self.eos_token_id):
                tokens = [*tokens, self.eos_token_id][:max_new_tokens]
            self.generated_tokens += len(tokens)
            rows.append(tokens + [self.pad_token_id] * (max_new_tokens - len(tokens)))
        return torch.tensor(rows, dtype=torch.long, device=batch["input_ids"].device)

    def update(self, model: torch.nn.Module) -> None:
        """Give the engine the policy's current adapter (a new name: vLLM caches by name)."""
        self.version += 1
        name = f"policy-{self.version}"
        path = self.adapter_dir / name
        model.save_pretrained(path)
        self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        previous, self.name = self.name, name
        self._post("unload_lora_adapter", {"lora_name": previous})
        shutil.rmtree(self.adapter_dir / previous, ignore_errors=True)

    def _post(self, route: str, body: dict[str, Any]) -> None:
        root = self.base_url.removesuffix("/v1")
        answer = self.client.post(f"{root}/v1/{route}", json=body)
        if answer.status_code != 200:
            raise EngineError(
                f"rollout engine: /v1/{route}: HTTP {answer.status_code}: {answer.text[:500]}"
            )

    def close(self) -> None:
        self.client.close()


def check_rollout_engine(config: Any) -> None:
    """rollout_engine=vllm needs an adapter vLLM can load at run time: fail before loading."""
    if getattr(config.objective, "rollout_engine", "in_process") != "vllm":
        return
    if config.adapter.name not in ADAPTERS_VLLM_LOADS or config.adapter.use_dora:
        raise ConfigError(
            f"objective.rollout_engine: vllm takes the policy's weights as a LoRA adapter; "
            f"adapter={config.adapter.name} is not one it loads (use adapter=lora)"
        )


@contextlib.contextmanager
def vllm_rollouts(
    config: Any, loaded: Any, cache_dir: str, run_dir: Path
) -> Iterator[VllmRollouts]:
    """vLLM serving the policy's base and its current adapter, for the duration of training."""
    from lmstack.serving.engines import serve

    adapter_dir = run_dir / "rollout-adapters"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    loaded.model.save_pretrained(adapter_dir / "policy-0")
    rank = int(config.adapter.r)
    base = Path(loaded.base_path)
    serving = VllmServingConfig(
        model=str(base.resolve() if base.exists() else base),
        max_model_len=int(config.data.max_length),
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        extra_args=[
            "--enable-lora",
            "--max-loras",
            "1",
            "--max-lora-rank",
            str(lora_rank_size(rank)),
            "--lora-modules",
            f"policy-0={adapter_dir / 'policy-0'}",
        ],
        gateway=False,
    )
    engine_config = SimpleNamespace(serving=serving, paths=config.paths, model=config.model)
    tokenizer = loaded.tokenizer
    try:
        with serve(engine_config, cache_dir, run_dir / "rollout-engine", gateway=False) as end:
            rollouts = VllmRollouts(
                end.base_url, adapter_dir, tokenizer.pad_token_id, tokenizer.eos_token_id
            )
            try:
                yield rollouts
            finally:
                rollouts.close()
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)
