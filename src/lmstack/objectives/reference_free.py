"""What the reference-free pairwise objectives (orpo, simpo) share: a LightningModule that scores
each batch's P pairs with the policy alone, in one forward pass, and a loss function of those
scores.

Unlike DPO there is no reference model at all: no frozen copy after full fine-tuning, no
adapter-off pass, nothing precomputed. The batch is DPO's (`collate_preference`: P chosen
sequences, then P rejected ones, padded or packed into one row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmstack.objectives.causal_lm import TrainedModelModule
from lmstack.objectives.pairs import completion_logprob_totals


@dataclass
class PairScores:
    """The policy's completion log-probs of P pairs: sums and token counts, each ``(P,)``."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        """Token-averaged (length-normalised) log-prob of each chosen completion."""
        return self.chosen_sum / self.chosen_tokens.clamp(min=1.0)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected_sum / self.rejected_tokens.clamp(min=1.0)

    @property
    def chosen_nll(self) -> torch.Tensor:
        """Mean cross-entropy over every chosen completion token of the batch (the SFT loss on
        the chosen side, as TRL's CrossEntropyLoss over the chosen rows)."""
        return -self.chosen_sum.sum() / self.chosen_tokens.sum().clamp(min=1.0)


def score_pairs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> PairScores:
    """One forward pass of the policy over the batch's 2P sequences."""
    totals, tokens = completion_logprob_totals(model, batch)
    chosen_sum, rejected_sum = totals.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    return PairScores(chosen_sum, rejected_sum, chosen_tokens, rejected_tokens)


# (scores, objective config) -> losses.orpo_loss / simpo_loss's dict
PairLoss = Callable[[PairScores, Any], dict[str, torch.Tensor]]


class ReferenceFreePairModule(TrainedModelModule):
    """Trains the policy on `pair_loss(score_pairs(policy, batch), objective)`."""

    def __init__(
        self, model: torch.nn.Module, objective: Any, total_steps: int, pair_loss: PairLoss
    ):
        super().__init__(model, objective, total_steps)
        self.pair_loss = pair_loss

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[dict, int]:
        scores = score_pairs(self.model, batch)
        return self.pair_loss(scores, self.objective), scores.chosen_sum.numel()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        result, pairs = self.step(batch)
        # means over the global batch: every rank holds as many pairs (data.batch_size / world)
        log = dict(batch_size=pairs, sync_dist=True)
        self.log("train/loss", result["loss"], prog_bar=True, **log)
        self.log("train/nll", result["nll"].detach(), **log)
        self.log("train/reward_margin", result["margins"].mean(), **log)
        self.log("train/reward_accuracy", result["accuracy"], **log)
        self.log("train/rewards_chosen", result["chosen_rewards"].mean(), **log)
        self.log("train/rewards_rejected", result["rejected_rewards"].mean(), **log)
        return result["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        result, pairs = self.step(batch)
        self.log("val/loss", result["loss"], prog_bar=True, batch_size=pairs)
        self.log("val/nll", result["nll"], batch_size=pairs)
        self.log("val/reward_margin", result["margins"].mean(), batch_size=pairs)
        # a tie counts half, as DPO's: chance is 0.5
        ties = (result["margins"] == 0).float().mean()
        self.log("val/reward_accuracy", result["accuracy"] + 0.5 * ties, batch_size=pairs)
