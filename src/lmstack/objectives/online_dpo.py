"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback") as a
LightningModule, on GRPO's rollouts.

Per batch of B prompts: sample G = ``objective.group_size`` completions of each from the
current policy (in process, or on the vLLM rollout engine) and score them with the weighted
reward functions, exactly as GRPO does (:class:`~lmstack.objectives.grpo.ScoredRolloutModule`).
A prompt's best-scored completion is the chosen one and its worst the rejected one (G = 2:
the paper's and TRL's pair; G > 2: best against worst, as Yuan et al. 2024's Self-Rewarding
LMs); a group whose rewards are all equal gives no pair (counted, ``train/pairs_tied``). The
pairs take one update of the DPO family's loss (``objective.loss_type``,
:func:`~lmstack.objectives.losses.dpo_loss`) on the completions' summed log-probs under the
policy and the reference (the base with its adapter off, or a frozen copy).

Against TRL 1.16's ``OnlineDPOTrainer`` (trl/experimental/online_dpo/online_dpo_trainer.py,
``training_step``): the same log-probs (the model's own, temperature 1, summed over the
completion tokens) and the same ``sigmoid`` loss; TRL makes the first sample the chosen one
on a tie, here a tie gives no pair; TRL's ``ipo`` squares the summed margin, here ``ipo`` is
lmstack's DPO family's (token-averaged log-probs, as TRL's ``DPOTrainer``), and any loss of
the family, or a weighted mix, may be used.
"""

from __future__ import annotations

from typing import Any

import torch

from lmstack.objectives import Objective
from lmstack.objectives.grpo import Scored, ScoredRolloutModule, group_rollout_setup
from lmstack.objectives.losses import dpo_loss, uniform_groups
from lmstack.objectives.reference import reference_of
from lmstack.objectives.rollout import completion_logprobs


def preference_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` row indices, each ``(P,)``: the best- and worst-rewarded sample
    of every group of ``group_size`` consecutive rows whose rewards are not all equal (P of
    the N / group_size groups; the first of equal best or worst ones)."""
    groups = rewards.view(-1, group_size)
    varied = ~uniform_groups(rewards, group_size)
    starts = torch.arange(groups.shape[0], device=rewards.device) * group_size
    chosen = (starts + groups.argmax(dim=1))[varied]
    rejected = (starts + groups.argmin(dim=1))[varied]
    return chosen, rejected


def pair_dpo_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, objective: Any
) -> dict[str, torch.Tensor]:
    """The DPO family's loss (:func:`~lmstack.objectives.losses.dpo_loss`, by ``objective``'s
    beta, loss_type, loss_weights, label_smoothing, discopop_tau) of P pairs given as 2P rows,
    the chosen completions then the rejected ones: ``(2P, L)`` per-token log-probs of the
    policy and the reference (0 off ``mask``), summed per completion; the token counts go
    with them for the length-normalised losses (ipo, sigmoid_norm, sft)."""
    mask = mask.to(policy_logps.dtype)
    policy_chosen, policy_rejected = (policy_logps * mask).sum(-1).chunk(2)
    ref_chosen, ref_rejected = (ref_logps * mask).sum(-1).chunk(2)
    chosen_tokens, rejected_tokens = mask.sum(-1).clamp(min=1).chunk(2)
    return dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=objective.beta,
        loss_type=objective.loss_type,
        label_smoothing=objective.label_smoothing,
        loss_weights=objective.loss_weights,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        discopop_tau=objective.discopop_tau,
    )


class OnlineDPOModule(ScoredRolloutModule):
    """GRPO's sampling, scoring, sample log and validation; pairs of each group's best and
    worst completion under the DPO loss against the reference."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        scored = self.sample_scored(batch)
        self.watch_rewards(batch, scored)
        chosen, rejected = preference_pairs(scored.rewards, self.objective.group_size)
        tied = scored.rewards.numel() // self.objective.group_size - chosen.numel()
        paired = chosen.numel() > 0
        if not paired:
            # every group tied: an update of weight 0 on the first group's samples, so every
            # rank runs its backward (DDP's gradient all-reduce) and trainer.max_steps still
            # counts batches (Adam's momentum moves the weights that step)
            chosen, rejected = torch.tensor([0]), torch.tensor([1])
        result, policy_chosen, policy_rejected = self.pair_loss(scored, chosen, rejected)
        self.take_update(result["loss"] if paired else result["loss"] * 0.0)
        self.publish_policy()
        self.log_batch(scored, chosen.numel() if paired else 0, tied)
        if paired:
            self.log_pairs(scored, result, chosen, rejected, policy_chosen, policy_rejected)

    def pair_loss(self, scored: Scored, chosen: torch.Tensor, rejected: torch.Tensor):
        """``(dpo_loss result, policy chosen log-probs, policy rejected log-probs)`` of the
        pairs ``(chosen[p], rejected[p])`` of rollout rows."""
        rows = torch.cat([chosen, rejected]).to(scored.completions.device)
        inputs = (
            scored.prompt_ids[rows],
            scored.prompt_mask[rows],
            scored.completions[rows],
            scored.mask[rows],
        )
        # the policy's own distribution (temperature 1), as DPO's reward is defined on it; the
        # sampling temperature only shapes which completions are drawn
        policy = completion_logprobs(self.model, *inputs)
        with torch.no_grad(), reference_of(self.model, self.reference) as reference:
            ref = completion_logprobs(reference, *inputs)
        result = pair_dpo_loss(policy, ref, inputs[3], self.objective)
        policy_chosen, policy_rejected = policy.detach().sum(-1).chunk(2)
        return result, policy_chosen, policy_rejected

    def log_batch(self, scored: Scored, pairs: int, tied: int) -> None:
        """The batch's loss-free figures: its rewards, completion lengths and pair counts."""
        size = scored.rewards.numel()
        log = dict(batch_size=size, sync_dist=True)
        self.log("train/reward_mean", scored.rewards.mean(), prog_bar=True, **log)
        for key, scores in scored.parts.items():
            self.log(f"train/reward_{key}", scores.float().mean(), **log)
        self.log("train/completion_length", scored.mask.sum(-1).float().mean(), **log)
        # counts summed over ranks: prompts with a pair, and prompts whose rewards all tied
        for key, count in (("pairs", pairs), ("pairs_tied", tied)):
            self.log(f"train/{key}", float(count), batch_size=1, sync_dist=True, reduce_fx="sum")

    def log_pairs(
        self,
        scored: Scored,
        result: dict[str, torch.Tensor],
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
    ) -> None:
        """TRL's online DPO figures under train/: the loss, the implicit rewards
        ``beta (log pi - log pi_ref)`` of each side, their margins and accuracy, the log-probs,
        and the reward functions' gap between chosen and rejected (TRL's scores_margin)."""
        log = dict(batch_size=chosen.numel(), sync_dist=True)
        self.log("train/loss", result["loss"].detach(), prog_bar=True, **log)
        self.log("train/rewards/chosen", result["chosen_rewards"].mean(), **log)
        self.log("train/rewards/rejected", result["rejected_rewards"].mean(), **log)
        self.log("train/rewards/margins", result["margins"].mean(), **log)
        self.log("train/rewards/accuracies", result["accuracy"], **log)
        self.log("train/logps/chosen", policy_chosen.mean(), **log)
        self.log("train/logps/rejected", policy_rejected.mean(), **log)
        gap = scored.rewards[chosen] - scored.rewards[rejected]
        self.log("train/score_margin", gap.float().mean(), **log)


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=group_rollout_setup(OnlineDPOModule))
