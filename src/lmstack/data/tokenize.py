"""Rows to token ids and labels, through the tokenizer's own chat template.

Every example is a dict with `input_ids` and `labels` (lists of ints; -100 marks
a token that is not a target). Tokenisation happens once, before training, so
the training loop only batches ready ids.
"""

from __future__ import annotations

from typing import Any

from lmstack.errors import DataError

IGNORE_INDEX = -100


def encode_text(text: str, tokenizer: Any, max_length: int | None) -> dict[str, list[int]]:
    """Plain text for pretraining: every token after BOS is a target
    (``max_length=None``: uncut, for `fit_length` to decide)."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    ids = [*ids[: None if max_length is None else max_length - 1], tokenizer.eos_token_id]
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


def prompt_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn; a list of messages (TRL's
    conversational format: a system prompt, earlier turns) is taken as it is."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def completion_messages(completion: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A completion (or a chosen/rejected answer) as chat messages: a string is one
    assistant turn; a list of messages is taken as it is."""
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return list(completion)


def encode_messages(
    messages: list[dict[str, str]],
    tokenizer: Any,
    max_length: int | None,
    completion_only: bool = True,
    first_target: int = 0,
) -> dict[str, list[int]]:
    """A chat: the assistant turns from message ``first_target`` on are targets (all
    tokens when completion_only=false); ``max_length=None`` leaves it uncut.

    Each assistant turn's tokens are found by rendering the conversation up to
    that turn with and without it, which works for any template whose
    rendering of a prefix is a prefix of the whole.
    """
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    labels = list(full) if not completion_only else [IGNORE_INDEX] * len(full)
    if completion_only:
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or index < first_target:
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
    prompt: str | list[dict[str, str]],
    completion: str | list[dict[str, str]],
    tokenizer: Any,
    max_length: int | None,
    completion_only: bool = True,
) -> dict[str, list[int]]:
    """Only the completion's assistant turns are targets (not those of a multi-turn prompt)."""
    context = prompt_messages(prompt)
    messages = context + completion_messages(completion)
    return encode_messages(messages, tokenizer, max_length, completion_only, len(context))


def encode_row(
    row: dict[str, Any],
    fmt: str,
    tokenizer: Any,
    max_length: int | None,
    completion_only: bool = True,
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
    row: dict[str, Any], tokenizer: Any, max_length: int | None
) -> dict[str, dict[str, list[int]]]:
    """A preference pair: the same prompt with the chosen and with the rejected completion."""
    return {
        key: encode_prompt_completion(row["prompt"], row[key], tokenizer, max_length)
        for key in ("chosen", "rejected")
    }


def has_target(example: dict[str, list[int]]) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"])


def sequences(example: dict[str, Any]) -> list[dict[str, list[int]]]:
    """The token sequences of an example: itself, or a pair's chosen and rejected ones."""
    return [example["chosen"], example["rejected"]] if "chosen" in example else [example]


def fit_length(
    examples: list[dict[str, Any]], max_length: int, truncation: str
) -> tuple[list[dict[str, Any]], int]:
    """Uncut examples (or pairs) fitted to max_length as ``data.truncation`` says:
    ``truncate`` cuts the end off a sequence that is too long, ``drop`` leaves the
    example out. Returns the examples and how many were over max_length."""
    fitted, over = [], 0
    for example in examples:
        if all(len(seq["input_ids"]) <= max_length for seq in sequences(example)):
            fitted.append(example)
            continue
        over += 1
        if truncation == "truncate":
            for seq in sequences(example):
                seq["input_ids"], seq["labels"] = (
                    seq["input_ids"][:max_length],
                    seq["labels"][:max_length],
                )
            fitted.append(example)
    return fitted, over


def truncation_metrics(over: int, truncation: str) -> dict[str, int]:
    """How many rows were over data.max_length, under the key of what happened to them."""
    return {f"data/{'truncated' if truncation == 'truncate' else 'dropped'}_rows": over}
