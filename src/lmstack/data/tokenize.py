"""Rows to token ids and labels, through the tokenizer's own chat template.

Every example is a dict with `input_ids` and `labels` (lists of ints; -100 marks
a token that is not a target). Tokenisation happens once, before training, so
the training loop only batches ready ids.
"""

from __future__ import annotations

from typing import Any

from lmstack.errors import DataError

IGNORE_INDEX = -100


def encode_text(text: str, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Plain text for pretraining: every token after BOS is a target."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    ids = [*ids[: max_length - 1], tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]}


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def encode_messages(
    messages: list[dict[str, str]], tokenizer: Any, max_length: int, completion_only: bool = True
) -> dict[str, list[int]]:
    """A chat: the assistant turns are targets (all tokens when completion_only=false).

    Each assistant turn's tokens are found by rendering the conversation up to
    that turn with and without it, which works for any template whose
    rendering of a prefix is a prefix of the whole.
    """
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    labels = list(full) if not completion_only else [IGNORE_INDEX] * len(full)
    if completion_only:
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
            start = len(prefix)
            end = len(render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False))
            if full[:start] != prefix:
                raise DataError(
                    "the tokenizer's chat template does not render a conversation's prefix as a "
                    "prefix of the whole, so assistant tokens cannot be located; use "
                    "objective.completion_only=false or a template that does"
                )
            labels[start:end] = full[start:end]
    labels[0] = IGNORE_INDEX
    return {"input_ids": full[:max_length], "labels": labels[:max_length]}


def encode_prompt_completion(
    prompt: str, completion: str, tokenizer: Any, max_length: int, completion_only: bool = True
) -> dict[str, list[int]]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return encode_messages(messages, tokenizer, max_length, completion_only)


def encode_row(
    row: dict[str, Any], fmt: str, tokenizer: Any, max_length: int, completion_only: bool = True
) -> dict[str, list[int]]:
    if fmt == "text":
        return encode_text(row["text"], tokenizer, max_length)
    if fmt == "messages":
        return encode_messages(row["messages"], tokenizer, max_length, completion_only)
    if fmt in ("prompt_completion", "preference"):
        completion = row["completion"] if fmt == "prompt_completion" else row["chosen"]
        return encode_prompt_completion(
            row["prompt"], completion, tokenizer, max_length, completion_only
        )
    raise DataError(f"data.format: cannot encode rows of format '{fmt}'")


def encode_preference(
    row: dict[str, Any], tokenizer: Any, max_length: int
) -> dict[str, dict[str, list[int]]]:
    """A preference pair: the same prompt with the chosen and with the rejected completion."""
    return {
        key: encode_prompt_completion(row["prompt"], row[key], tokenizer, max_length)
        for key in ("chosen", "rejected")
    }


def has_target(example: dict[str, list[int]]) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"])
