"""REINFORCE Leave-One-Out (Ahmadian et al. 2024) as a LightningModule, on GRPO's rollouts.

Per batch of B prompts: sample k = ``group_size`` completions each and score them exactly as
GRPO does (:mod:`lmstack.objectives.grpo`); the reward is penalised by ``beta`` times the
sampling policy's summed log-ratio to the reference, and each sample's baseline is the mean
reward of its k - 1 siblings, :func:`~lmstack.objectives.losses.rloo_advantages`. The policy
update is TRL's clipped sequence-level objective, :func:`~lmstack.objectives.losses.rloo_loss`.
"""

from __future__ import annotations

from typing import Any

import torch

from lmstack.objectives import Objective
from lmstack.objectives.grpo import GRPOModule, group_rollout_setup
from lmstack.objectives.losses import rloo_advantages, rloo_kl_rewards, rloo_loss


class RLOOModule(GRPOModule):
    """GRPO's sampling, scoring, logging and validation; RLOO's advantages and loss."""

    def group_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        # without the KL penalty, which needs the policy's log-probs (the first update's pass)
        return rloo_advantages(rewards, self.objective.group_size)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        objective = self.objective
        rollout = self.rollout(batch)
        self.watch_rewards(batch, rollout)
        old_logps = None
        for _ in range(objective.iterations):
            logps = self.policy_logps(self.model, rollout)
            if old_logps is None:
                # the first pass is the sampling policy: its log-ratio to the reference is the
                # KL penalty in the reward, which the leave-one-out baseline then centres
                old_logps = logps.detach()
                if rollout.ref_logps is not None:
                    rewards = rloo_kl_rewards(
                        rollout.rewards, old_logps, rollout.ref_logps, rollout.mask, objective.beta
                    )
                    rollout.advantages = rloo_advantages(rewards, objective.group_size)
            result = rloo_loss(
                logps,
                old_logps,
                rollout.advantages,
                rollout.mask,
                objective.clip_eps_low,
                objective.clip_eps_high,
            )
            if rollout.ref_logps is not None:
                mask = rollout.mask.to(old_logps.dtype)
                kl = ((old_logps - rollout.ref_logps) * mask).sum() / mask.sum().clamp(min=1.0)
                result["kl"] = kl
            self.take_update(result["loss"])
        self.publish_policy()
        self.log_rollout(rollout, result)


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=group_rollout_setup(RLOOModule))
