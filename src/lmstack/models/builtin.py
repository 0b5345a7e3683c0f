"""lmstack's own tiny world: a BPE tokenizer with a chat template and a tiny Llama model.

Everything is built locally from the built-in task with fixed seeds, so the
whole stack runs and is tested on a CPU with no downloads. `tiny_base` is the
random model after a short pretraining run through the same Lightning path as
`objective=pretrain`; it is cached as an ordinary Hugging Face model folder
under a hash of its settings, so every later step loads it like any hub model.

Deferred imports, for start-up time: lightning, numpy, tokenizers, torch and transformers
(and the lmstack modules that load them) are imported inside the functions that need them;
the CLI's input checks import this module first.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmstack.config.groups.model import BUILTIN_BUILD_VERSION, TinyLlamaConfig
from lmstack.config.groups.objective import PretrainObjectiveConfig
from lmstack.data.arith import corpus_for_tokenizer, pretraining_corpus
from lmstack.data.tokenize import encode_text
from lmstack.models.export import save_model
from lmstack.util.hashing import stable_hash

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# in config/groups/model.py, beside the shape it versions: run identities hash it too
BUILD_VERSION = BUILTIN_BUILD_VERSION
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the task's text; digits are one token each, which
    makes arithmetic learnable by a small model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_for_tokenizer(seed), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        padding_side="right",
        model_max_length=4096,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def llama_config_fields(shape: TinyLlamaConfig) -> dict[str, Any]:
    """The built-in shape in Hugging Face's LlamaConfig (config.json) terms."""
    return {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "tie_word_embeddings": True,
    }


def build_random_model(
    shape: TinyLlamaConfig, tokenizer: PreTrainedTokenizerFast
) -> LlamaForCausalLM:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # the tokenizer's own size: its trainer may learn fewer tokens than shape.vocab_size
    fields = llama_config_fields(shape) | {"vocab_size": len(tokenizer)}
    config = LlamaConfig(**fields, **special)
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special, do_sample=False, max_new_tokens=32)
    return model


def base_key(shape: TinyLlamaConfig, pretrained: bool) -> str:
    return stable_hash({"shape": asdict(shape), "pretrained": pretrained, "build": BUILD_VERSION})


def builtin_folder(shape: TinyLlamaConfig, pretrained: bool, cache_dir: str | Path) -> Path:
    """Where the built-in model of this shape lives (or will, once built)."""
    name = "tiny_base" if pretrained else "tiny_random"
    return Path(cache_dir).resolve() / f"{name}-{base_key(shape, pretrained)}"


def ensure_builtin_model(shape: TinyLlamaConfig, pretrained: bool, cache_dir: str | Path) -> Path:
    """The folder of the built-in model, building it on first use (safe across processes)."""
    folder = builtin_folder(shape, pretrained, cache_dir)
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.with_suffix(".lock")):
        if (folder / "config.json").exists():  # another process built it meanwhile
            return folder
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with isolated_random_state():
            _build_into(staging, shape, pretrained)
        staging.rename(folder)
    return folder


# Lightning's seed_everything records its seed here; its dataloader workers read it
SEED_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextmanager
def isolated_random_state():
    """Runs a build with its own seeds, leaving every random generator (Python's, NumPy's,
    torch's) and Lightning's seed variables as they were. A run that builds the base on
    first use then draws the same numbers as one that finds it cached, so a lock file
    replayed on an empty cache reproduces the run."""

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    env = {name: os.environ.get(name) for name in SEED_ENV}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@contextmanager
def file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_into(folder: Path, shape: TinyLlamaConfig, pretrained: bool) -> None:
    tokenizer = build_tokenizer(shape.vocab_size, seed=shape.seed)
    model = build_random_model(shape, tokenizer)
    if pretrained:
        print(f"lmstack: building tiny_base (first use; cached in {folder.parent})", flush=True)
        _pretrain(model, tokenizer, shape, folder)

    save_model(model, folder)
    tokenizer.save_pretrained(folder)


def _pretrain(model, tokenizer, shape: TinyLlamaConfig, folder: Path) -> None:
    """A short next-token run on the task's plain-text form, through Lightning."""
    import lightning as L

    from lmstack.data.loading import build_train_loader
    from lmstack.tracking.progress import progress_bar

    texts = pretraining_corpus(8000, seed=shape.seed)
    examples = [
        encode_text(text, tokenizer, max_length=shape.max_position_embeddings) for text in texts
    ]
    loader = build_train_loader(examples, shape.pretrain_batch_size, packing=True, seed=shape.seed)
    objective = PretrainObjectiveConfig(lr=shape.pretrain_lr, warmup_steps=20)
    module = _pretraining_module(model, objective, total_steps=shape.pretrain_steps)
    L.seed_everything(shape.seed, verbose=False)
    trainer = L.Trainer(
        max_steps=shape.pretrain_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(folder.parent),
        gradient_clip_val=1.0,
        callbacks=[progress_bar()],
    )
    trainer.fit(module, train_dataloaders=loader)
    model.eval()


def _pretraining_module(model, objective: PretrainObjectiveConfig, total_steps: int):
    """The next-token loss on every target token, AdamW on a warm-up + cosine schedule: what
    objective=pretrain's module computes (objectives/causal_lm.py), from the same functions
    (models/next_token.py), so building the base needs nothing from the objectives layer."""
    import lightning as L

    from lmstack.models.next_token import adamw_with_schedule, target_token_logprobs

    class PretrainingModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            logps, _ = target_token_logprobs(self.model, batch)
            loss = -logps.mean()
            self.log("train/loss", loss, prog_bar=True)  # the build's progress bar shows it
            return loss

        def configure_optimizers(self):
            return adamw_with_schedule(self.model, objective, total_steps)

    return PretrainingModule()
