"""llama.cpp's convert_hf_to_gguf.py, run with two additions lmstack's models need.

    python -m lmstack.models.gguf_convert LLAMA_CPP_SRC MODEL_DIR --outfile F --outtype f16

- The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a test
  string, and refuses hashes it has not seen. lmstack's built-in tokenizer (and SmolLM's)
  splits digits one by one and then applies GPT-2's byte-level rule, which is llama.cpp's
  "smollm" pre-tokenizer; an unknown hash with exactly that pre-tokenizer gets that name.
- Chat templates written for transformers may mark the assistant's turn with
  `{% generation %}` (for assistant-only training masks); llama.cpp's template engine does
  not know that tag and it changes nothing at inference, so it is left out of the GGUF.

gguf and llama.cpp's conversion module (the gguf extra, not always installed) are imported
where used.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

GENERATION_TAGS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")
DIGITS_THEN_BYTE_LEVEL = "smollm"


def is_digits_then_byte_level(model_dir: Path) -> bool:
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        return False
    pre = json.loads(tokenizer_json.read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    return (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits") is True
        and steps[1].get("type") == "ByteLevel"
        and steps[1].get("use_regex", True) is True
    )


def patch_converter(model_dir: Path) -> None:
    import gguf
    from conversion.base import TextModel

    known_pre = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return known_pre(self, tokenizer)
        except NotImplementedError:
            if is_digits_then_byte_level(model_dir):
                return DIGITS_THEN_BYTE_LEVEL
            raise

    TextModel.get_vocab_base_pre = vocab_base_pre
    add_chat_template = gguf.GGUFWriter.add_chat_template

    def without_generation_tags(self, value) -> None:
        if isinstance(value, str):
            value = GENERATION_TAGS.sub("", value)
        add_chat_template(self, value)

    gguf.GGUFWriter.add_chat_template = without_generation_tags


def main() -> None:
    source, args = Path(sys.argv[1]), sys.argv[2:]
    sys.path[:0] = [str(source), str(source / "gguf-py")]
    model_dir = Path(next(arg for arg in args if not arg.startswith("-")))
    patch_converter(model_dir)
    sys.argv = [str(source / "convert_hf_to_gguf.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
