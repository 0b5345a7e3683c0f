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

import time
from dataclasses import dataclass
from typing import Any

import torch

from lmstack.objectives import Objective, ObjectiveSetup
from lmstack.objectives.causal_lm import TrainedModelModule
from lmstack.objectives.losses import grpo_advantages, grpo_loss
from lmstack.objectives.reference import frozen_reference, keep_frozen_in_eval, reference_of
from lmstack.objectives.reward_functions import (
    RewardGuard,
    build_reward_functions,
    rollout_samples,
    save_samples,
    score_completions,
)
from lmstack.objectives.rollout import (
    completion_logprobs,
    completion_mask,
    prompt_setup,
    repeat_prompts,
    sample_completions,
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
    from lmstack.errors import DataError
    from lmstack.objectives.reward_functions import REFERENCE_REWARDS

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
class Rollout:
    """G sampled completions per prompt, row ``b * G + g`` for prompt ``b``'s sample ``g``."""

    prompt_ids: torch.Tensor  # (N, P), left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completions: torch.Tensor  # (N, L)
    mask: torch.Tensor  # (N, L) bool: tokens up to and including the first EOS
    rewards: torch.Tensor  # (N,) weighted sum
    parts: dict[str, torch.Tensor]  # each reward function's (N,) scores
    advantages: torch.Tensor  # (N,)
    ref_logps: torch.Tensor | None  # (N, L); None when beta = 0
    texts: list[str] | None = None  # the decoded completions (for samples and checks)


class GRPOModule(TrainedModelModule):
    def __init__(
        self,
        model: torch.nn.Module,
        objective: Any,
        total_steps: int,
        reward_functions: list,
        tokenizer: Any,
        gradient_clip_val: float = 0.0,
    ):
        super().__init__(model, objective, total_steps)
        self.reward_functions = reward_functions
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.tokenizer = tokenizer
        self.gradient_clip_val = gradient_clip_val
        # several policy updates per batch of rollouts: Lightning's loop would take one
        self.automatic_optimization = False
        # no reference at all when the KL term is off (beta = 0)
        self.reference = frozen_reference(model, needed=objective.beta > 0)
        self.reward_guard = RewardGuard(reward_functions, objective.reward_check_steps)
        self.rollouts_done = 0
        # objective.rollout_engine=vllm: the train phase attaches lmstack.serving.rollouts'
        # engine here (sample(batch, n, ...) and update(model)); None samples in process
        self.rollout_engine = None
        # sampling time and generated tokens: rollout tokens/s, in process or on the engine
        self.rollout_seconds, self.rollout_tokens = 0.0, 0

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_in_eval(self.reference)
        return self

    # rollouts

    def sample(self, batch: dict[str, Any], num_samples: int, greedy: bool = False):
        """``(completion ids, mask, decoded texts)`` for each prompt's samples."""
        objective = self.objective
        started = time.perf_counter()
        if self.rollout_engine is not None and not greedy:
            completions = self.rollout_engine.sample(
                batch, num_samples, objective.max_new_tokens, objective.temperature, objective.top_p
            )
        else:
            completions = sample_completions(
                self.model,
                batch,
                num_samples,
                objective.max_new_tokens,
                self.pad_token_id,
                self.eos_token_id,
                sample=not greedy,
                temperature=objective.temperature,
                top_p=objective.top_p,
            )
        mask = completion_mask(completions, self.eos_token_id)
        if not greedy:
            self.rollout_seconds += time.perf_counter() - started
            self.rollout_tokens += int(mask.sum())
        texts = self.tokenizer.batch_decode(
            completions.masked_fill(~mask, self.pad_token_id), skip_special_tokens=True
        )
        return completions, mask, texts

    def score(self, batch: dict[str, Any], texts: list[str], num_samples: int):
        """Weighted rewards and their parts for ``num_samples`` texts per prompt."""
        prompts = [p for p in batch["prompt"] for _ in range(num_samples)]
        answers = [a for a in batch["answer"] for _ in range(num_samples)]
        total, parts = score_completions(self.reward_functions, prompts, texts, answers)
        return total.to(self.device), parts

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        group = self.objective.group_size
        completions, mask, texts = self.sample(batch, group)
        rewards, parts = self.score(batch, texts, group)
        prompt_ids, prompt_mask = repeat_prompts(batch, group)
        rollout = Rollout(
            prompt_ids,
            prompt_mask,
            completions,
            mask,
            rewards,
            parts,
            grpo_advantages(rewards, group),
            None,
            texts,
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
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
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
            optimizer.zero_grad()
            self.manual_backward(result["loss"])
            if self.gradient_clip_val:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)
            optimizer.step()
            scheduler.step()
        if self.rollout_engine is not None:  # the next rollouts come from this policy
            self.rollout_engine.update(self.model)
        self.log_rollout(rollout, result)

    def watch_rewards(self, batch: dict[str, Any], rollout: Rollout) -> None:
        """The constant-reward check of the first steps, and samples every log step."""
        samples = rollout_samples(batch, rollout, self.objective.group_size)
        self.reward_guard.observe(rollout.rewards, rollout.parts, samples[0] if samples else {})
        every = max(1, self.trainer.log_every_n_steps) if self._trainer is not None else 1
        if self.rollouts_done % every == 0:
            save_samples(self, samples[: self.objective.samples_per_log], self.rollouts_done)
        self.rollouts_done += 1

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
        _, _, texts = self.sample(batch, 1, greedy=True)
        rewards, parts = self.score(batch, texts, 1)
        size = rewards.numel()
        self.log("val/reward_mean", rewards.mean(), prog_bar=True, batch_size=size)
        for key, scores in parts.items():
            self.log(f"val/reward_{key}", scores.float().mean(), batch_size=size)


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup)
