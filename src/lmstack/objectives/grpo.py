"""Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath) as a LightningModule.

Per batch of B prompts: sample G completions each (in process, ``model.generate`` with a KV
cache), score them with the weighted reward functions, turn the rewards into group-relative
advantages ``A_i = (r_i - mean_group r) / (std_group r + eps)``, then take ``iterations``
policy updates on :func:`~lmstack.objectives.losses.grpo_loss` over the completion tokens.
The variants (objective.loss_type, importance_sampling_level, clip_eps_low/high,
scale_rewards, dynamic_sampling, overlong_buffer, mask_truncated_completions) follow TRL 1.16.

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
from lmstack.objectives.losses import (
    grpo_advantages,
    grpo_loss,
    overlong_penalty,
    uniform_groups,
)
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


def group_rollout_setup(module_class: type) -> Any:
    """The setup of an objective on GRPO's group rollouts (GRPO, RLOO): prompt batches
    (left-padded, chat-rendered) and its `module_class`."""

    def setup(config: Any, loaded: Any, rows: Any) -> ObjectiveSetup:
        objective = config.objective
        require_answers(objective.rewards, rows)
        module = module_class(
            loaded.model,
            objective,
            config.trainer.max_steps,
            build_reward_functions(objective.rewards),
            loaded.tokenizer,
            config.trainer.gradient_clip_val,
        )
        return prompt_setup(config, loaded, rows, module)

    return setup


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
    groups_dropped: int = 0  # groups left out of the update by dynamic sampling

    def rows(self, kept: torch.Tensor) -> Rollout:
        """A rollout of only the ``kept`` rows (a bool ``(N,)`` mask)."""
        fields = {
            name: value[kept] if isinstance(value, torch.Tensor) else value
            for name, value in vars(self).items()
        }
        fields["parts"] = {key: scores[kept] for key, scores in self.parts.items()}
        fields["texts"] = [text for text, keep in zip(self.texts, kept.tolist()) if keep]
        return Rollout(**fields)


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
        objective = self.objective
        group = objective.group_size
        sampled = self.sample(batch, group)
        rewards, parts = self.score(batch, sampled.texts, group)
        if objective.overlong_buffer > 0:
            parts["overlong"] = overlong_penalty(
                sampled.mask.sum(-1),
                objective.max_new_tokens,
                objective.overlong_buffer,
                objective.overlong_penalty,
            ).to(rewards.device)
            rewards = rewards + parts["overlong"]
        if objective.mask_truncated_completions:
            # no EOS: cut off at max_new_tokens, so its reward judges an unfinished answer
            finished = (sampled.completions == self.tokenizer.eos_token_id).any(-1, keepdim=True)
            sampled.mask = sampled.mask & finished
        rollout = Rollout(
            **vars(sampled),
            rewards=rewards,
            parts=parts,
            advantages=self.group_advantages(rewards),
            ref_logps=None,
        )
        if objective.beta > 0:
            rollout.ref_logps = self.reference_logps(rollout)
        return rollout

    def group_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        objective = self.objective
        return grpo_advantages(rewards, objective.group_size, scale=objective.scale_rewards)

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
        trained = rollout
        if self.objective.dynamic_sampling == "drop":
            trained = drop_uniform_groups(rollout, self.objective.group_size)
            dropped = float(rollout.groups_dropped)
            size = rollout.rewards.numel()
            self.log("train/groups_dropped", dropped, batch_size=size, sync_dist=True)
        old_logps = None
        for _ in range(self.objective.iterations):
            logps = self.policy_logps(self.model, trained)
            if old_logps is None:
                old_logps = logps.detach()
            result = grpo_loss(
                logps,
                old_logps,
                old_logps if trained.ref_logps is None else trained.ref_logps,
                trained.advantages,
                trained.mask,
                clip_eps=self.objective.clip_eps_low,
                beta=self.objective.beta,
                clip_eps_high=self.objective.clip_eps_high,
                loss_type=self.objective.loss_type,
                importance_sampling_level=self.objective.importance_sampling_level,
                max_completion_length=self.objective.max_new_tokens,
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


def drop_uniform_groups(rollout: Rollout, group_size: int) -> Rollout:
    """DAPO's dynamic sampling, drop form (Yu et al. 2025): groups whose rewards all agree have
    zero advantages, so they only dilute a token-mean loss; the update sees the others. The
    count goes on ``rollout`` (logged with the full batch's rewards). When every group agrees
    the batch is kept whole (an update on its KL term alone), so that trainer.max_steps still
    counts one update per batch."""
    uniform = uniform_groups(rollout.rewards, group_size)
    rollout.groups_dropped = int(uniform.sum())
    if rollout.groups_dropped in (0, uniform.numel()):
        return rollout
    return rollout.rows((~uniform).repeat_interleave(group_size))


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=group_rollout_setup(GRPOModule))
