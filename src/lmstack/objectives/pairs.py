"""Preference-pair data shared by the pairwise objectives (dpo, orpo, simpo, reward), and the
completion log-probs they score pairs by."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lmstack.data.loading import build_eval_loader, build_train_loader
from lmstack.data.tokenize import encode_preference, fit_length, has_target, truncation_metrics
from lmstack.models.next_token import target_token_logprobs
from lmstack.objectives import ObjectiveSetup, require_examples


def completion_logprob_totals(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(totals, tokens)``, each ``(S,)``: the summed completion log-probs of the batch's S
    sequences and how many completion tokens each has; S padded rows, or the sequences packed
    in one row (``position_ids``). One forward pass, logits only where a completion token is
    predicted (:func:`target_token_logprobs`)."""
    labels = batch["labels"]
    logps, keep = target_token_logprobs(model, batch)
    if "position_ids" in batch:  # the sequence that label position t + 1 belongs to
        starts = batch["position_ids"][0] == 0
        owner = torch.zeros_like(labels)
        owner[0, :-1] = (starts.cumsum(0) - 1)[1:]
        count = int(starts.sum())
    else:
        owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        count = labels.shape[0]
    groups = owner[keep]
    totals = logps.new_zeros(count).index_add(0, groups, logps)
    tokens = logps.new_zeros(count).index_add(0, groups, torch.ones_like(logps))
    return totals, tokens


def encode_pairs(
    items: list[dict], tokenizer: Any, max_length: int, truncation: str = "truncate"
) -> tuple[list[dict], int]:
    """Each row as a chosen and a rejected chat fitted to max_length (``truncation``),
    dropping pairs that cannot be compared; and how many pairs were over max_length."""

    pairs = [encode_preference(row, tokenizer, None) for row in items]
    pairs, over = fit_length(pairs, max_length, truncation)
    # a pair whose either side lost every target token cannot be compared
    return [p for p in pairs if has_target(p["chosen"]) and has_target(p["rejected"])], over


def preference_setup(
    config: Any,
    loaded: Any,
    rows: Any,
    module: Any,
    prepare: Callable | None = None,
    packing: bool = False,
) -> ObjectiveSetup:
    """Loaders of preference pairs, batched as all chosen rows then all rejected rows
    (``packing``: all in one padding-free row).

    ``prepare(pairs) -> metrics`` may annotate the encoded pairs first (DPO attaches
    precomputed reference log-probs)."""

    data, tokenizer = config.data, loaded.tokenizer
    train, over_train = encode_pairs(rows.train, tokenizer, data.max_length, data.truncation)
    held_out, over_eval = encode_pairs(rows.eval, tokenizer, data.max_length, data.truncation)
    require_examples(train, rows.origin, data.max_length)
    pad = tokenizer.pad_token_id
    metrics = truncation_metrics(over_train + over_eval, data.truncation)
    metrics |= prepare(train + held_out) if prepare else {}
    return ObjectiveSetup(
        module=module,
        train_loader=build_train_loader(
            train, data.batch_size, packing, config.seed, pad, data.num_workers, preference=True
        ),
        eval_loader=build_eval_loader(held_out, data.batch_size, packing, pad, preference=True)
        if held_out
        else None,
        train_examples=len(train),
        eval_examples=len(held_out),
        metrics=metrics,
    )
