"""Attention that is padding-free in fact: packed rows attend per sequence.

A packed row (see `lmstack.data.loading.collate_packed`) holds a batch's
sequences side by side, with `position_ids` restarting at 0 for each. Plain SDPA
handles it with an L x L block-diagonal mask over the whole row, which costs
(sum of lengths)^2 time and memory and keeps SDPA off its fused kernels; on a CPU
(no FlashAttention varlen kernel) that can cost more than the padding it saved.
Here each sequence gets its own causal SDPA call instead: sum(length^2) work, and
the fused, memory-efficient kernel. Everything else (padded batches, generation
with a KV cache) goes to transformers' SDPA unchanged.

Deferred imports, for start-up time: transformers (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import torch

NAME = "lmstack_packed_sdpa"


def register() -> str:
    """Registers the attention (and SDPA's mask builder under the same name); returns the
    name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def sequence_spans(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """(start, end) of each sequence in a single packed row, or None if it is not one."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return list(zip(starts, [*starts[1:], length]))


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q, k, v are (batch, heads, length, dim);
    returns (batch, length, heads, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = None
    # no KV cache in play, and no sliding window (a per-sequence causal call would drop it)
    if query.shape[2] == key.shape[2] and getattr(module, "sliding_window", None) is None:
        spans = sequence_spans(kwargs.get("position_ids"), query.shape[2])
    if spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # split, not slices: the backward of N slices of one tensor fills and adds N tensors
    # of the whole row's size (O(N x row) work and memory per layer); split's backward
    # concatenates the N gradients once
    lengths = [end - start for start, end in spans]
    groups = getattr(module, "num_key_value_groups", 1)
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            # grouped-query heads share their key/value head in the kernel: no repeated copy
            enable_gqa=groups > 1,
        )
        for q, k, v in zip(
            query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
        )
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None
