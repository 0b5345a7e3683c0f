"""Next-token objectives (pretrain and SFT) as one LightningModule.

Pretraining and SFT share the loss; they differ only in which tokens the data
marks as targets (all of them, or the assistant's), which the data layer decides.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from lmstack.data.loading import build_eval_loader, build_train_loader
from lmstack.data.tokenize import encode_row, fit_length, has_target, truncation_metrics
from lmstack.distributed import all_reduce_sum
from lmstack.models import memory
from lmstack.objectives import Objective, ObjectiveSetup, require_examples


def setup(config: Any, loaded: Any, rows: Any) -> ObjectiveSetup:
    """Rows as token ids with target labels, in packed (or padded) batches."""
    data, tokenizer = config.data, loaded.tokenizer
    completion_only = getattr(config.objective, "completion_only", True)
    over = 0

    def encode_all(items: list[dict]) -> list[dict]:
        nonlocal over
        encoded = [encode_row(r, rows.format, tokenizer, None, completion_only) for r in items]
        fitted, cut = fit_length(encoded, data.max_length, data.truncation)
        over += cut
        return [e for e in fitted if has_target(e)]

    train, held_out = encode_all(rows.train), encode_all(rows.eval)
    require_examples(train, rows.origin, data.max_length)
    pad = tokenizer.pad_token_id
    return ObjectiveSetup(
        module=CausalLMModule(loaded.model, config.objective, config.trainer.max_steps),
        train_loader=build_train_loader(
            train, data.batch_size, data.packing, config.seed, pad, data.num_workers
        ),
        eval_loader=build_eval_loader(held_out, data.batch_size, data.packing, pad)
        if held_out
        else None,
        train_examples=len(train),
        eval_examples=len(held_out),
        metrics=truncation_metrics(over, data.truncation),
    )


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {name for name, param in module.named_parameters() if param.requires_grad}
    return {name: tensor for name, tensor in module.state_dict().items() if name in names}


class TrainedModelModule(L.LightningModule):
    """What every objective's module shares: `self.model` trained with AdamW on a warm-up +
    cosine schedule over `total_steps`, and checkpoints that hold only the trained weights
    (an adapter, or all weights when fully fine-tuning); the frozen base is reloaded from its
    own folder."""

    def __init__(self, model: torch.nn.Module, objective: Any, total_steps: int):
        super().__init__()
        self.model = model
        self.objective = objective
        self.total_steps = total_steps
        self.strict_loading = False

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, self.objective, self.total_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trained_weights(checkpoint, self.model)


class CausalLMModule(TrainedModelModule):
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).logits

    def target_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N,)`` log-probabilities of the batch's N target tokens."""
        if not target_positions(batch["labels"]).any():
            raise ValueError("causal LM batch has no supervised token (every label is -100)")
        logps, _ = target_token_logprobs(self.model, batch)
        return logps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logps = self.target_logprobs(batch)
        loss = global_token_mean(logps, self.trainer.world_size)
        # under DDP each rank's loss is its share of the global mean: their mean is the loss
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        targets = torch.tensor(float(logps.numel()), device=logps.device)
        self.log("train/target_tokens", targets, reduce_fx="sum", sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = -self.target_logprobs(batch).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=1)


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
    of its time. Past memory.LOGIT_CHUNK_ELEMENTS they are computed a chunk of tokens at a time and
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
    chunk = max(1, memory.LOGIT_CHUNK_ELEMENTS // vocabulary(model))
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


def global_token_mean(logps: torch.Tensor, world: int) -> torch.Tensor:
    """This rank's part of the mean cross-entropy over every target token of the global batch.

    DDP averages gradients over ranks, so each rank returns `world * sum_local / N_global`
    (N_global: target tokens on all ranks): the average is then exactly the gradient of one
    process's loss on the whole batch, however unevenly the tokens fall across ranks.
    """
    if world == 1:
        return -logps.mean()
    total = all_reduce_sum(torch.tensor(float(logps.numel()), device=logps.device))
    return -logps.sum() * world / total


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


def keep_trained_weights(checkpoint: dict[str, Any], model: torch.nn.Module) -> None:
    """Drop everything but `model`'s trained weights (held as `self.model`) from a checkpoint."""
    trained = {f"model.{name}" for name in trainable_state(model)}
    checkpoint["state_dict"] = {
        key: value for key, value in checkpoint["state_dict"].items() if key in trained
    }


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1):
    """Linear warm-up, then cosine decay to `floor` times the peak rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup)
