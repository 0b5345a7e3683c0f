"""Direct Preference Optimisation (Rafailov et al. 2023) as a LightningModule.

Each batch holds P pairs as 2P padded rows (chosen rows, then rejected rows; see
`collate_preference`), scored in one forward pass by the policy and one by the
reference. The reference is the policy with its adapter switched off when there is
one (no second copy of the base weights), else a frozen copy taken at the start.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch

from lmstack.objectives.causal_lm import adamw_with_schedule, keep_trained_weights
from lmstack.objectives.losses import dpo_loss, sequence_logprobs


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class DPOModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, objective: Any, total_steps: int):
        super().__init__()
        self.model = model
        self.objective = objective
        self.total_steps = total_steps
        # checkpoints hold only the trained weights; the base (and so the reference) is
        # reloaded from its own folder
        self.strict_loading = False
        self.reference: torch.nn.Module | None = None
        if not _is_peft(model):
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            # the reference is a fixed function: no dropout, whatever Lightning asks
            self.reference.eval()
        return self

    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """``(chosen, rejected)`` log-probs of the completions, each ``(P,)``.

        Summed over completion tokens, or averaged over them for ``loss=ipo``.
        """
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
        ).logits
        average = self.objective.loss == "ipo"
        logps = sequence_logprobs(logits, batch["labels"], average=average)
        return logps.chunk(2)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]):
        if self.reference is not None:
            return self.sequence_logps(self.reference, batch)
        # eval mode so dropout cannot make the reference noisy; each module's own mode is put
        # back afterwards (a loaded model may mix modes, and train() would flatten them)
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.sequence_logps(self.model, batch)
        finally:
            for module, mode in modes:
                module.training = mode

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        ref_chosen, ref_rejected = self.reference_logps(batch)
        chosen, rejected = self.sequence_logps(self.model, batch)
        result = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.objective.beta,
            loss_type=self.objective.loss,
            label_smoothing=self.objective.label_smoothing,
        )
        return result, chosen.detach(), rejected.detach()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        result, chosen, rejected = self.step(batch)
        pairs = chosen.numel()
        self.log("train/loss", result["loss"], prog_bar=True, batch_size=pairs)
        self.log("train/reward_margin", result["margins"].mean(), batch_size=pairs)
        self.log("train/reward_accuracy", result["accuracy"], batch_size=pairs)
        self.log("train/logps_chosen", chosen.mean(), batch_size=pairs)
        self.log("train/logps_rejected", rejected.mean(), batch_size=pairs)
        return result["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        result, chosen, _ = self.step(batch)
        pairs = chosen.numel()
        self.log("val/loss", result["loss"], prog_bar=True, batch_size=pairs)
        self.log("val/reward_accuracy", result["accuracy"], batch_size=pairs)

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, self.objective, self.total_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trained_weights(checkpoint, self.model)
