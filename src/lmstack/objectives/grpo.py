"""Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath) as a LightningModule.

Per batch of B prompts: sample G completions each (in process, ``model.generate`` with a KV
cache), score them with the weighted reward functions, turn the rewards into group-relative
advantages ``A_i = (r_i - mean_group r) / (std_group r + eps)``, then take ``iterations``
policy updates on :func:`~lmstack.objectives.losses.grpo_loss` over the completion tokens.

Optimisation is manual (several updates per batch of rollouts), so ``trainer.max_steps``
counts policy updates. The old log-probs are those of the first update's forward pass: the
weights have not moved yet, so they equal a separate no-grad pass. The reference is the
policy with its adapter switched off, or a frozen copy after full fine-tuning (none when
``beta = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmstack.errors import DataError
from lmstack.objectives import Objective, ObjectiveSetup
from lmstack.objectives.losses import grpo_advantages, grpo_loss
from lmstack.objectives.reference import reference_of
from lmstack.objectives.reward_functions import (
    REFERENCE_REWARDS,
    RewardGuard,
    build_reward_functions,
    rollout_samples,
    save_samples,
    score_completions,
)
from lmstack.objectives.rollout import (
    RolloutModule,
    Sampled,
    completion_logprobs,
    prompt_setup,
)


def setup(config: Any, loaded: Any, rows: Any) -> ObjectiveSetup:
    """Prompt batches (left-padded, chat-rendered) and the GRPO module."""
    objective = config.objective
    require_answers(objective.rewards, rows)
    module = GRPOModule(
        loaded.model,
        objective,
        config.trainer.max_steps,
        build_reward_functions(objective.rewards),
        loaded.tokenizer,
        config.trainer.gradient_clip_val,
    )
    return prompt_setup(config, loaded, rows, module)


def require_answers(rewards: list[Any], rows: Any) -> None:
    """The verifier and reference rewards compare against each row's "answer" (or
    "reference"): every row needs one. A user's scorer may do without."""
    needing = [
        reward.name
        for reward in rewards
        if reward.name == "verifier" or reward.name in REFERENCE_REWARDS[:-1]
    ]
    if not needing:
        return
    for row in [*rows.train, *rows.eval]:
        if row.get("answer", row.get("reference")) in (None, ""):
            raise DataError(
                f"{rows.origin}:{row.get('_line', '?')}: row has no 'answer' or 'reference', "
                f"which the {', '.join(needing)} reward in objective.rewards checks "
                "completions against"
            )


@dataclass
class Rollout(Sampled):
    """G sampled completions per prompt, row ``b * G + g`` for prompt ``b``'s sample ``g``."""

    rewards: torch.Tensor  # (N,) weighted sum
    parts: dict[str, torch.Tensor]  # each reward function's (N,) scores
    advantages: torch.Tensor  # (N,)
    ref_logps: torch.Tensor | None  # (N, L); None when beta = 0


class GRPOModule(RolloutModule):
    def __init__(
        self,
        model: torch.nn.Module,
        objective: Any,
        total_steps: int,
        reward_functions: list,
        tokenizer: Any,
        gradient_clip_val: float = 0.0,
    ):
        # no reference at all when the KL term is off (beta = 0)
        super().__init__(
            model,
            objective,
            total_steps,
            tokenizer,
            gradient_clip_val,
            needs_reference=objective.beta > 0,
        )
        self.reward_functions = reward_functions
        self.reward_guard = RewardGuard(reward_functions, objective.reward_check_steps)

    # rollouts

    def score(self, batch: dict[str, Any], texts: list[str], num_samples: int):
        """Weighted rewards and their parts for ``num_samples`` texts per prompt."""
        prompts = [p for p in batch["prompt"] for _ in range(num_samples)]
        answers = [a for a in batch["answer"] for _ in range(num_samples)]
        total, parts = score_completions(self.reward_functions, prompts, texts, answers)
        return total.to(self.device), parts

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        group = self.objective.group_size
        sampled = self.sample(batch, group)
        rewards, parts = self.score(batch, sampled.texts, group)
        rollout = Rollout(
            **vars(sampled),
            rewards=rewards,
            parts=parts,
            advantages=grpo_advantages(rewards, group),
            ref_logps=None,
        )
        if self.objective.beta > 0:
            rollout.ref_logps = self.reference_logps(rollout)
        return rollout

    def policy_logps(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        # the ratio and the KL are those of the sampling policy, softmax(logits / temperature)
        return completion_logprobs(
            model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completions,
            rollout.mask,
            self.objective.temperature,
        )

    @torch.no_grad()
    def reference_logps(self, rollout: Rollout) -> torch.Tensor:
        with reference_of(self.model, self.reference) as reference:
            return self.policy_logps(reference, rollout)

    # optimisation

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch)
        self.watch_rewards(batch, rollout)
        old_logps = None
        for _ in range(self.objective.iterations):
            logps = self.policy_logps(self.model, rollout)
            if old_logps is None:
                old_logps = logps.detach()
            result = grpo_loss(
                logps,
                old_logps,
                old_logps if rollout.ref_logps is None else rollout.ref_logps,
                rollout.advantages,
                rollout.mask,
                clip_eps=self.objective.clip_eps,
                beta=self.objective.beta,
            )
            self.take_update(result["loss"])
        self.publish_policy()
        self.log_rollout(rollout, result)

    def watch_rewards(self, batch: dict[str, Any], rollout: Rollout) -> None:
        """The constant-reward check of the first steps, and samples every log step."""
        samples = rollout_samples(batch, rollout, self.objective.group_size)
        self.reward_guard.observe(rollout.rewards, rollout.parts, samples[0] if samples else {})
        step = self.samples_due()
        if step is not None:
            save_samples(self, samples[: self.objective.samples_per_log], step)

    def log_rollout(self, rollout: Rollout, result: dict[str, torch.Tensor]) -> None:
        """Statistics of the batch's rollouts and of its last policy update."""
        size = rollout.rewards.numel()
        self.log(
            "train/loss", result["loss"].detach(), prog_bar=True, batch_size=size, sync_dist=True
        )
        self.log(
            "train/reward_mean",
            rollout.rewards.mean(),
            prog_bar=True,
            batch_size=size,
            sync_dist=True,
        )
        self.log("train/reward_std", rollout.rewards.std(), batch_size=size, sync_dist=True)
        for key, scores in rollout.parts.items():
            self.log(f"train/reward_{key}", scores.float().mean(), batch_size=size, sync_dist=True)
        if rollout.ref_logps is not None:
            self.log("train/kl", result["kl"], batch_size=size, sync_dist=True)
        self.log("train/clip_fraction", result["clip_fraction"], batch_size=size, sync_dist=True)
        lengths = rollout.mask.sum(-1).float()
        self.log("train/completion_length", lengths.mean(), batch_size=size, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy completions of held-out prompts, scored by the same reward functions."""
        texts = self.sample(batch, 1, greedy=True).texts
        rewards, parts = self.score(batch, texts, 1)
        size = rewards.numel()
        self.log("val/reward_mean", rewards.mean(), prog_bar=True, batch_size=size)
        for key, scores in parts.items():
            self.log(f"val/reward_{key}", scores.float().mean(), batch_size=size)


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup)
