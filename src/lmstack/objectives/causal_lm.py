"""Next-token objectives (pretrain and SFT) as one LightningModule.

Pretraining and SFT share the loss; they differ only in which tokens the data
marks as targets (all of them, or the assistant's), which the data layer decides.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lmstack.data.loading import build_eval_loader, build_train_loader
from lmstack.data.tokenize import encode_row, fit_length, has_target, truncation_metrics
from lmstack.distributed import all_reduce_sum
from lmstack.models.next_token import adamw_with_schedule, target_positions, target_token_logprobs
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


def keep_trained_weights(checkpoint: dict[str, Any], model: torch.nn.Module) -> None:
    """Drop everything but `model`'s trained weights (held as `self.model`) from a checkpoint."""
    trained = {f"model.{name}" for name in trainable_state(model)}
    checkpoint["state_dict"] = {
        key: value for key, value in checkpoint["state_dict"].items() if key in trained
    }


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup)
