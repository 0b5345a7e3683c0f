"""Prompt rows for online RL: chat-rendered prompt ids, left-padded for generation.

A batch is a dict with ``input_ids`` and ``attention_mask`` (left-padded, so every row's
generation continues from the same column) plus the rows' ``prompt`` texts and ``answer``
values (None where a row has none), which reward functions read.
"""

from __future__ import annotations

from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lmstack.data.loading import ResumableBatchSampler
from lmstack.data.tokenize import prompt_messages, render_chat
from lmstack.errors import DataError


def encode_prompts(
    rows: list[dict[str, Any]], tokenizer: Any, max_prompt_length: int, origin: str
) -> list[dict[str, Any]]:
    """Each row's prompt as a user turn plus the assistant header; longer prompts are dropped
    (cutting one would lose its question or its chat header)."""
    examples = []
    for row in rows:
        # a string is one user turn; a message list (system prompt, earlier turns) as it is
        ids = render_chat(tokenizer, prompt_messages(row["prompt"]), add_generation_prompt=True)
        if len(ids) <= max_prompt_length:
            answer = row.get("answer", row.get("reference"))
            if answer is not None and not isinstance(answer, dict | list):
                answer = str(answer)  # structured references (JSON answers) stay as they are
            examples.append({"input_ids": ids, "prompt": row["prompt"], "answer": answer})
    if rows and not examples:
        raise DataError(
            f"{origin}: every prompt is longer than {max_prompt_length} tokens "
            "(data.max_length minus objective.max_new_tokens)"
        )
    return examples


def collate_prompts(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Left-padded prompt ids with an attention mask, and the rows' texts and answers."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, width - length :] = torch.tensor(example["input_ids"])
        attention_mask[row, width - length :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt": [example["prompt"] for example in examples],
        "answer": [example["answer"] for example in examples],
    }


class PromptCollator:
    """Picklable collate function (worker processes need to pickle it)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_prompts(examples, self.pad_token_id)


def build_prompt_loader(
    examples: list[dict[str, Any]],
    batch_size: int,
    seed: int,
    pad_token_id: int,
    num_workers: int = 0,
) -> StatefulDataLoader:
    """Resumable shuffled prompt batches (the position travels in the checkpoint)."""
    sampler = ResumableBatchSampler(len(examples), min(batch_size, len(examples)), seed)
    return StatefulDataLoader(
        examples,
        batch_sampler=sampler,
        collate_fn=PromptCollator(pad_token_id),
        num_workers=num_workers,
    )


def build_prompt_eval_loader(
    examples: list[dict[str, Any]], batch_size: int, pad_token_id: int
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        examples, batch_size=batch_size, shuffle=False, collate_fn=PromptCollator(pad_token_id)
    )
