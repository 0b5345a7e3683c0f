"""Batching: padding-free packing, padded batches, and a resumable batch order.

Packing puts a batch's sequences side by side in one row; `position_ids`
restart at 0 for each, and with no attention mask transformers derives a
block-causal mask from them, so attention never crosses sequences and no
compute is spent on pad tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lmstack.data.tokenize import IGNORE_INDEX
from lmstack.distributed import distributed_world


class ResumableBatchSampler:
    """Shuffled batches of indices, reshuffled each epoch from (seed, epoch).

    Its state (epoch, batches served) travels in Lightning's checkpoint through
    StatefulDataLoader, so a resumed run sees exactly the batches an
    uninterrupted run would have seen.

    Under DDP/FSDP each batch is the global batch: every rank draws the same order and keeps
    its own contiguous share (`batch_size / world_size` indices), so every rank takes the same
    number of steps and the ranks together see what one process would. The state counts
    global batches, the same on every rank: the checkpoint (written by rank zero) restores
    each rank to its own position.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.served = 0

    def __len__(self) -> int:
        return max(1, self.num_examples // self.batch_size)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def __iter__(self):
        order = self._order()
        batches = [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]
        rank, world = distributed_world()
        while self.served < len(batches):
            batch = shard(batches[self.served], rank, world)
            self.served += 1
            yield batch
        self.epoch += 1
        self.served = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.served = state["served"]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous share of a global batch (the whole batch in one process)."""
    if world == 1:
        return batch
    size = len(batch) // world
    return batch[rank * size : (rank + 1) * size]


def collate_packed(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """One row holding every sequence; position_ids restart per sequence."""
    input_ids, labels, positions = [], [], []
    for example in examples:
        input_ids += example["input_ids"]
        # the first token of each sequence is never a target: it would be
        # predicted from the previous sequence's last token
        labels += [IGNORE_INDEX, *example["labels"][1:]]
        positions += range(len(example["input_ids"]))
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }


def collate_padded(
    examples: list[dict[str, list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, 1:length] = torch.tensor(example["labels"][1:length])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_preference(
    examples: list[dict[str, dict[str, list[int]]]], pad_token_id: int, packing: bool = False
) -> dict[str, torch.Tensor]:
    """One batch of 2P sequences: the P chosen ones, then the P rejected ones.

    Sequence ``i`` and sequence ``P + i`` are a pair, so one forward pass scores both
    sides; as 2P padded rows, or with ``packing`` side by side in one row (padding-free).
    """
    rows = [example["chosen"] for example in examples]
    rows += [example["rejected"] for example in examples]
    batch = collate_packed(rows) if packing else collate_padded(rows, pad_token_id)
    if "ref_logps" in examples[0]:  # precomputed reference log-probs travel with their pair
        batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
    return batch


class _Collator:
    """Picklable collate function (worker processes need to pickle it)."""

    def __init__(self, packing: bool, pad_token_id: int, preference: bool = False):
        self.packing = packing
        self.pad_token_id = pad_token_id
        self.preference = preference

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.preference:
            return collate_preference(examples, self.pad_token_id, self.packing)
        if self.packing:
            return collate_packed(examples)
        return collate_padded(examples, self.pad_token_id)


def build_train_loader(
    examples: list[dict[str, list[int]]],
    batch_size: int,
    packing: bool,
    seed: int,
    pad_token_id: int = 0,
    num_workers: int = 0,
    preference: bool = False,
) -> StatefulDataLoader:
    """Resumable shuffled batches; ``preference=True`` takes pairs."""
    sampler = ResumableBatchSampler(len(examples), min(batch_size, len(examples)), seed)
    return StatefulDataLoader(
        examples,
        batch_sampler=sampler,
        collate_fn=_Collator(packing, pad_token_id, preference),
        num_workers=num_workers,
    )


def build_eval_loader(
    examples: list[dict[str, Any]],
    batch_size: int,
    packing: bool,
    pad_token_id: int = 0,
    preference: bool = False,
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=_Collator(packing, pad_token_id, preference),
    )
