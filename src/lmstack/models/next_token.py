"""Next-token log-probabilities and the optimiser every trained model shares, below the
objectives: the objectives' modules and the built-in base's pretraining (models/builtin.py)
both compute their loss and step their weights with these, so building the base needs nothing
from lmstack.objectives.

Target logits are computed at the positions that predict a target only, and past
LOGIT_CHUNK_ELEMENTS a chunk of tokens at a time (recomputed in backward).
"""

from __future__ import annotations

import math
from typing import Any

import torch

# past this many elements a step's target logits are computed a chunk of tokens at a time and
# recomputed in the backward pass (SFT and the objectives on stored pairs or labels), so no
# more than a chunk's logits exist at once (256 MB at float32); the memory plan counts one chunk
LOGIT_CHUNK_ELEMENTS = 1 << 26


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: position t predicts a target (``labels[:, t + 1] != -100``)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def target_token_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, keep)``: the ``(N,)`` log-probabilities of the batch's N target tokens (padded
    rows, or sequences packed in one row with ``position_ids``) and the ``(B, T)`` positions
    that predict them (:func:`target_positions`).

    Logits are computed at those positions only: with a real vocabulary (49k) the full
    ``(B, T, V)`` logits of prompt and padding positions are most of a step's memory and much
    of its time. Past LOGIT_CHUNK_ELEMENTS they are computed a chunk of tokens at a time and
    recomputed in the backward pass (:func:`chunked_logprobs`), never held whole."""
    labels = batch["labels"]
    keep = target_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask"),
        "position_ids": batch.get("position_ids"),
        "use_cache": False,
    }
    parts = decoder_and_head(model)
    # (N, V) float32 logits of long rows, with a 49k vocabulary, are gigabytes
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // vocabulary(model))
    if parts is not None and targets.numel() > chunk:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[keep]
        return chunked_logprobs(hidden, head, targets, chunk), keep
    logits = model(**inputs, logits_to_keep=keep).logits
    if logits.dim() == 3:  # an architecture that returns every position's logits
        logits = logits[keep]
    logps = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return logps, keep


def decoder_and_head(model: torch.nn.Module) -> tuple[Any, Any] | None:
    """The transformer body and the LM head of a causal LM (under peft too), when its logits
    are the head's output as it is; None for one that changes them after (soft-capping)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None):
        return None
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def vocabulary(model: torch.nn.Module) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(getattr(getattr(base, "config", None), "vocab_size", 0) or 1)


def chunked_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``(N,)`` log p(target) from ``(N, H)`` final hidden states, `chunk` tokens at a time.
    Each chunk's logits are checkpointed: the backward pass recomputes them, so at most one
    chunk's ``(chunk, V)`` float32 logits (and their gradient) exist at once."""
    from torch.utils.checkpoint import checkpoint

    return torch.cat(
        [
            checkpoint(
                token_logprobs,
                hidden[i : i + chunk],
                targets[i : i + chunk],
                head,
                use_reentrant=False,
            )
            for i in range(0, targets.numel(), chunk)
        ]
    )


def token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module):
    logits = head(hidden).float()
    return -torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def adamw_with_schedule(model: torch.nn.Module, objective: Any, total_steps: int) -> dict:
    """AdamW over the trainable parameters, stepped per batch by :func:`warmup_cosine`."""
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=objective.lr,
        weight_decay=objective.weight_decay,
        betas=tuple(objective.betas),
    )
    schedule = warmup_cosine(objective.warmup_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1):
    """Linear warm-up, then cosine decay to `floor` times the peak rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
