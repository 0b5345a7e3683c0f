"""Kahneman-Tversky Optimisation (Ethayarajh et al. 2024) as a LightningModule.

KTO learns from unpaired rows: a prompt, a completion and a thumbs up (``label: true``,
desirable) or down (``false``), the rows a gateway's feedback endpoint collects; a preference
pair is one desirable and one undesirable row. Each row's reward is its policy-vs-reference
log-ratio, measured against a reference point z0: the policy's KL to the reference, estimated
on mismatched pairs (a row's prompt with another row's completion).

Each row's mismatched partner is fixed once, at set-up, from a seeded cycle over the rows (TRL
fixes it too, as the neighbour in its sequential batches): batches here are shuffled, and a
fixed partner lets the reference log-probs of both sequences be precomputed and cached.
A batch of B rows is two sub-batches, B completions and their B KL sequences; the KL sequences
are scored without gradients, by the policy and by the reference (the base with its adapter
off, or a frozen copy after full fine-tuning).
"""

from __future__ import annotations

import functools
import random
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lmstack.data.loading import ResumableBatchSampler, collate_packed, collate_padded
from lmstack.data.tokenize import (
    IGNORE_INDEX,
    encode_prompt_completion,
    has_target,
    truncation_metrics,
)
from lmstack.objectives import Objective, ObjectiveSetup, require_examples
from lmstack.objectives.dpo import (
    ReferencedModule,
    cached_reference_logps,
    completion_sequence_logprobs,
    folder_fingerprint,
)
from lmstack.objectives.losses import kto_kl_estimate, kto_loss
from lmstack.objectives.reference import reference_of
from lmstack.tracking.identity import stable_hash


def setup(config: Any, loaded: Any, rows: Any) -> ObjectiveSetup:
    """Unpaired rows (preference pairs split in two), each with its mismatched KL sequence."""
    data, tokenizer = config.data, loaded.tokenizer
    module = KTOModule(loaded.model, config.objective, config.trainer.max_steps)

    def encode(items: list[dict]) -> tuple[list[dict], int]:
        unpaired = unpaired_rows(items, rows.format)
        return encode_unpaired(unpaired, tokenizer, data.max_length, data.truncation, config.seed)

    (train, over_train), (held_out, over_eval) = encode(rows.train), encode(rows.eval)
    require_examples(train, rows.origin, data.max_length)
    metrics = truncation_metrics(over_train + over_eval, data.truncation)
    collate = KTOCollator(data.packing, tokenizer.pad_token_id)
    if config.objective.precompute_ref:
        metrics |= precompute_reference(module, train + held_out, loaded, config, collate)
    sampler = ResumableBatchSampler(len(train), min(data.batch_size, len(train)), config.seed)
    train_loader = StatefulDataLoader(
        train, batch_sampler=sampler, collate_fn=collate, num_workers=data.num_workers
    )
    eval_loader = None
    if held_out:
        eval_loader = torch.utils.data.DataLoader(
            held_out, batch_size=data.batch_size, shuffle=False, collate_fn=collate
        )
    return ObjectiveSetup(
        module=module,
        train_loader=train_loader,
        eval_loader=eval_loader,
        train_examples=len(train),
        eval_examples=len(held_out),
        metrics=metrics,
    )


def unpaired_rows(items: list[dict], fmt: str) -> list[dict]:
    """Rows as ``{prompt, completion, label}``: a preference pair becomes its chosen answer
    (desirable) and its rejected one (undesirable), next to each other, both with the pair's
    index as ``pair`` (held-out accuracy is then measured pair by pair, as DPO's)."""
    if fmt != "preference":
        return list(items)
    return [
        {"prompt": row["prompt"], "completion": row[side], "label": side == "chosen", "pair": index}
        for index, row in enumerate(items)
        for side in ("chosen", "rejected")
    ]


def encode_unpaired(
    items: list[dict], tokenizer: Any, max_length: int, truncation: str, seed: int = 0
) -> tuple[list[dict], int]:
    """Each row as ``{completion, kl, desirable}``: its own chat and the mismatched one (its
    prompt, its KL partner's completion), fitted to max_length (``truncation``); rows with a
    side left without target tokens are dropped. Returns them and how many were too long."""
    chats = [
        split_at_completion(encode_prompt_completion(r["prompt"], r["completion"], tokenizer, None))
        for r in items
    ]
    partners = kl_partners(len(chats), seed)
    examples = [
        {
            "completion": join(prompt, chats[index][1]),
            "kl": join(prompt, chats[partners[index]][1]),
            "desirable": bool(row["label"]),
            "pair": row.get("pair"),
        }
        for index, (row, (prompt, _)) in enumerate(zip(items, chats))
    ]
    examples, over = fit_unpaired(examples, max_length, truncation)
    return [e for e in examples if has_target(e["completion"]) and has_target(e["kl"])], over


def split_at_completion(encoded: dict[str, list[int]]) -> tuple[list[int], dict[str, list[int]]]:
    """``(prompt ids, completion ids and labels)`` of an encoded prompt + completion chat: the
    completion starts at the first target token."""
    labels = encoded["labels"]
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    completion = {"input_ids": encoded["input_ids"][start:], "labels": labels[start:]}
    return encoded["input_ids"][:start], completion


def join(prompt: list[int], completion: dict[str, list[int]]) -> dict[str, list[int]]:
    return {
        "input_ids": prompt + completion["input_ids"],
        "labels": [IGNORE_INDEX] * len(prompt) + completion["labels"],
    }


def kl_partners(count: int, seed: int) -> list[int]:
    """The row whose completion each row's KL sequence borrows: the previous row in a seeded
    cycle through all rows, so no row is its own partner (with two rows or more) and the two
    halves of a split preference pair, which share a prompt, rarely meet."""
    order = random.Random(seed).sample(range(count), count)
    partners = [0] * count
    for position, index in enumerate(order):
        partners[index] = order[position - 1]
    return partners


def fit_unpaired(examples: list[dict], max_length: int, truncation: str) -> tuple[list[dict], int]:
    """As `fit_length` for both sequences of each row: ``truncate`` cuts what is too long,
    ``drop`` leaves the row out."""
    fitted, over = [], 0
    for example in examples:
        sequences = (example["completion"], example["kl"])
        if all(len(seq["input_ids"]) <= max_length for seq in sequences):
            fitted.append(example)
            continue
        over += 1
        if truncation == "truncate":
            for seq in sequences:
                seq["input_ids"], seq["labels"] = (
                    seq["input_ids"][:max_length],
                    seq["labels"][:max_length],
                )
            fitted.append(example)
    return fitted, over


class KTOCollator:
    """B rows as ``completions`` and ``kl`` sub-batches (padded rows, or each packed in one
    row), ``desirable`` ``(B,)`` and any precomputed reference log-probs. Picklable, for
    loader worker processes."""

    def __init__(self, packing: bool, pad_token_id: int):
        self.packing = packing
        self.pad_token_id = pad_token_id

    def _collate(self, sequences: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return (
            collate_packed(sequences)
            if self.packing
            else collate_padded(sequences, self.pad_token_id)
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {
            "completions": self._collate([e["completion"] for e in examples]),
            "kl": self._collate([e["kl"] for e in examples]),
            "desirable": torch.tensor([e["desirable"] for e in examples]),
        }
        if all(e.get("pair") is not None for e in examples):  # halves of preference pairs
            batch["pair"] = torch.tensor([e["pair"] for e in examples])
        if "ref_logps" in examples[0]:  # precomputed: [own completion, KL sequence]
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
        return batch


def reference_cache_key(examples: list[dict], loaded: Any, config: Any) -> str:
    """What the reference log-probs depend on: the reference weights and the exact token ids
    of both sequences of every row (beta, weights and loss variant are not in it)."""
    return stable_hash(
        {
            "objective": "kto",
            "model": folder_fingerprint(loaded.base_path),
            "quantization": vars(config.quantization),
            "examples": stable_hash([[e["completion"], e["kl"]] for e in examples], 32),
        },
        24,
    )


def precompute_reference(
    module: KTOModule, examples: list[dict], loaded: Any, config: Any, collate: KTOCollator
) -> dict[str, Any]:
    """Reference log-probs of each row's completion and KL sequence, once, cached on disk."""
    key = reference_cache_key(examples, loaded, config)
    batch_size = config.data.batch_size
    compute = functools.partial(_reference_pass, module, examples, batch_size, collate)
    return cached_reference_logps(module, config, key, examples, compute, "rows")


def _reference_pass(
    module: KTOModule, examples: list[dict], batch_size: int, collate: KTOCollator
) -> torch.Tensor:
    parts = []
    for start in range(0, len(examples), batch_size):
        print(f"lmstack: reference log-probs {start}/{len(examples)} rows", end="\r", flush=True)
        completion, kl = module.reference_logps(collate(examples[start : start + batch_size]))
        parts.append(torch.stack([completion, kl], dim=1))
    return torch.cat(parts)


class KTOModule(ReferencedModule):
    @property
    def uses_kl(self) -> bool:
        """apo_zero_unpaired has no reference point: no KL sequences are scored."""
        return self.objective.loss_type == "kto"

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B,)`` reference log-probs of the completions and of the KL sequences."""
        if "ref_logps" in batch:  # precomputed (objective.precompute_ref=true)
            return batch["ref_logps"].unbind(dim=1)
        self.reference_passes += 1
        with reference_of(self.model, self.reference) as reference:
            completion = completion_sequence_logprobs(reference, batch["completions"], False)
            if not self.uses_kl:
                return completion, torch.zeros_like(completion)
            return completion, completion_sequence_logprobs(reference, batch["kl"], False)

    def kl_estimate(self, batch: dict[str, Any], ref_kl: torch.Tensor) -> torch.Tensor:
        """The batch's KL estimate, averaged over ranks (as TRL gathers it)."""
        if not self.uses_kl:
            return ref_kl.new_zeros(())
        with torch.no_grad():
            policy_kl = completion_sequence_logprobs(self.model, batch["kl"], False)
        kl = kto_kl_estimate(policy_kl, ref_kl)
        if self._trainer is not None and self.trainer.world_size > 1:
            kl = self.all_gather(kl).mean()
        return kl

    def step(self, batch: dict[str, Any]) -> tuple[dict, torch.Tensor]:
        ref_logps, ref_kl = self.reference_logps(batch)
        kl = self.kl_estimate(batch, ref_kl)
        logps = completion_sequence_logprobs(self.model, batch["completions"], False)
        result = kto_loss(
            logps,
            ref_logps,
            batch["desirable"],
            kl,
            beta=self.objective.beta,
            desirable_weight=self.objective.desirable_weight,
            undesirable_weight=self.objective.undesirable_weight,
            loss_type=self.objective.loss_type,
        )
        return result, logps.detach()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        result, logps = self.step(batch)
        log = dict(batch_size=logps.numel(), sync_dist=True)
        self.log("train/loss", result["loss"], prog_bar=True, **log)
        self.log("train/kl", result["kl"], **log)
        self.log("train/reward_margin", result["margin"], **log)
        self.log("train/reward_accuracy", result["accuracy"], **log)
        self.log("train/logps", logps.mean(), **log)
        return result["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        result, logps = self.step(batch)
        rows = logps.numel()
        self.log("val/loss", result["loss"], prog_bar=True, batch_size=rows)
        self.log("val/kl", result["kl"], batch_size=rows)
        self.log("val/reward_margin", result["margin"], batch_size=rows)
        if "pair" in batch:  # split preference pairs: accuracy pair by pair, at the epoch's end
            self.held_out_rewards.append((batch["pair"], batch["desirable"], result["rewards"]))
            return
        # unpaired rows: desirable over undesirable rewards, every (desirable, undesirable)
        # couple in each batch; chance (and a policy equal to the reference) is 0.5
        self.log("val/reward_accuracy", result["accuracy"], batch_size=rows)

    def on_validation_epoch_start(self) -> None:
        self.held_out_rewards: list[tuple[torch.Tensor, ...]] = []

    def on_validation_epoch_end(self) -> None:
        if self.held_out_rewards:
            pair, desirable, rewards = (torch.cat(part) for part in zip(*self.held_out_rewards))
            self.log("val/reward_accuracy", paired_accuracy(pair, desirable, rewards))
        self.held_out_rewards = []


def paired_accuracy(pair: torch.Tensor, desirable: torch.Tensor, rewards: torch.Tensor):
    """Share of preference pairs whose chosen (desirable) row's reward beats its rejected
    row's, a tie counting half: DPO's held-out reward accuracy, so the two compare. Pairs
    with a half dropped (too long, no target tokens) are left out; none left gives 0.5."""
    chosen: dict[int, float] = {}
    rejected: dict[int, float] = {}
    for index, good, reward in zip(pair.tolist(), desirable.tolist(), rewards.tolist()):
        (chosen if good else rejected)[index] = reward
    both = chosen.keys() & rejected.keys()
    if not both:
        return torch.tensor(0.5)
    wins = [float(chosen[i] > rejected[i]) + 0.5 * (chosen[i] == rejected[i]) for i in both]
    return torch.tensor(sum(wins) / len(wins))


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup)
