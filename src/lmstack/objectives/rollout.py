"""Sampling completions of left-padded prompts, and scoring them token by token.

A rollout row is ``prompt ids (left-padded, width P) + completion ids (width L)``; the
completion mask keeps every generated token up to and including the first EOS.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from lmstack.objectives.losses import token_logprobs


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off inside; each submodule's own mode is put back afterwards (a loaded model
    may mix modes, which a plain ``train()`` would flatten)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


@torch.no_grad()
def sample_completions(
    model: Any,
    batch: dict[str, Any],
    num_samples: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int,
    sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """``(B * num_samples, L)`` completion ids, prompt ``b``'s samples in consecutive rows.

    Greedy when ``sample=False``. Rows that stop early are padded with ``pad_token_id``.
    """
    options: dict[str, Any] = {"do_sample": sample}
    if sample:
        # top_k=0: sample from the whole (temperature, top_p) distribution, not transformers'
        # default top 50
        options |= {"temperature": temperature, "top_p": top_p, "top_k": 0}
    with eval_mode(model):
        output = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            **options,
        )
    return output[:, batch["input_ids"].shape[1] :]


def completion_mask(completions: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Bool ``(N, L)``: 1 on each generated token up to and including the row's first EOS.

    ``mask[n, t] = (number of EOS in completions[n, :t]) == 0``.
    """
    is_eos = (completions == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos
    return eos_before == 0


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``(N, L)`` log-probs of the completion tokens under ``model`` (0 where ``mask`` is 0).

    ``log softmax(logits / temperature)``: the policy that sampled the tokens. Position ids
    count only real tokens, as generation does, so the left padding changes nothing.
    ``prompt_ids``/``prompt_mask`` already repeat each prompt per sample.
    """
    input_ids = torch.cat([prompt_ids, completions], dim=1)
    attention_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    start = prompt_ids.shape[1] - 1  # the logit at the last prompt column predicts token 0
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).logits[:, start:]
    labels = torch.cat([prompt_ids[:, -1:], completions.masked_fill(~mask, -100)], dim=1)
    logps, _ = token_logprobs(logits / temperature, labels)
    return logps


def repeat_prompts(batch: dict[str, Any], times: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's ids and mask repeated ``times`` in consecutive rows (as generate does)."""
    return (
        batch["input_ids"].repeat_interleave(times, dim=0),
        batch["attention_mask"].repeat_interleave(times, dim=0),
    )


def prompt_setup(config: Any, loaded: Any, rows: Any, module: Any):
    """Prompt batches for online RL (left-padded, chat-rendered, room left for the
    completion) around an already built module."""
    from lmstack.data.prompts import build_prompt_eval_loader, build_prompt_loader, encode_prompts
    from lmstack.objectives import ObjectiveSetup

    data, tokenizer = config.data, loaded.tokenizer
    max_prompt = data.max_length - config.objective.max_new_tokens
    train = encode_prompts(rows.train, tokenizer, max_prompt, rows.origin)
    held_out = encode_prompts(rows.eval, tokenizer, max_prompt, rows.origin)
    pad = tokenizer.pad_token_id
    return ObjectiveSetup(
        module=module,
        train_loader=build_prompt_loader(
            train, data.batch_size, config.seed, pad, data.num_workers
        ),
        eval_loader=build_prompt_eval_loader(held_out, data.batch_size, pad) if held_out else None,
        train_examples=len(train),
        eval_examples=len(held_out),
        # a prompt too long to leave room for its completion is always dropped
        metrics={
            "data/dropped_rows": len(rows.train) + len(rows.eval) - len(train) - len(held_out)
        },
    )
