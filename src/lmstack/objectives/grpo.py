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
from lightning.fabric.utilities import move_data_to_device

from lmstack.data.prompts import build_prompt_loader
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
        setup = prompt_setup(config, loaded, rows, module)
        if getattr(objective, "dynamic_sampling", "off") == "resample":
            # its own shuffle (seed + 1) and position: Lightning's loader, whose sampler keeps
            # the resumable epoch position, is never iterated twice
            module.extra_prompts = build_prompt_loader(
                setup.train_loader.dataset,
                config.data.batch_size,
                config.seed + 1,
                loaded.tokenizer.pad_token_id,
            )
        return setup

    return setup


def require_answers(rewards: list[Any], rows: Any) -> None:
    """The verifier and reference rewards compare against each row's "answer" (or
    "reference"): every row needs one. A user's scorer may do without."""
    needing = [
        reward.name
        for reward in rewards
        if reward.name in ("verifier", "math") or reward.name in REFERENCE_REWARDS[:-1]
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
class Scored(Sampled):
    """G sampled completions per prompt, row ``b * G + g`` for prompt ``b``'s sample ``g``,
    with their rewards."""

    rewards: torch.Tensor  # (N,) weighted sum
    parts: dict[str, torch.Tensor]  # each reward function's (N,) scores


@dataclass
class Rollout(Scored):
    """GRPO's scored samples with their advantages and reference log-probs."""

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


class ScoredRolloutModule(RolloutModule):
    """An objective on scored on-policy samples (GRPO, RLOO, online DPO): ``group_size``
    completions of each prompt, scored by the weighted reward functions (plus DAPO's overlong
    penalty), watched for a constant reward in the first steps and saved as samples; held-out
    prompts answered greedily and scored the same way."""

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Any,
        total_steps: int,
        reward_functions: list,
        tokenizer: Any,
        gradient_clip_val: float = 0.0,
        needs_reference: bool = True,
    ):
        super().__init__(
            model, objective, total_steps, tokenizer, gradient_clip_val, needs_reference
        )
        self.reward_functions = reward_functions
        self.reward_guard = RewardGuard(reward_functions, objective.reward_check_steps)

    def score(self, batch: dict[str, Any], texts: list[str], num_samples: int):
        """Weighted rewards and their parts for ``num_samples`` texts per prompt."""
        prompts = [p for p in batch["prompt"] for _ in range(num_samples)]
        answers = [a for a in batch["answer"] for _ in range(num_samples)]
        total, parts = score_completions(self.reward_functions, prompts, texts, answers)
        return total.to(self.device), parts

    @torch.no_grad()
    def sample_scored(self, batch: dict[str, Any]) -> Scored:
        """``group_size`` sampled completions of each prompt and their rewards."""
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
        return Scored(**vars(sampled), rewards=rewards, parts=parts)

    def watch_rewards(self, batch: dict[str, Any], scored: Scored) -> None:
        """The constant-reward check of the first steps, and samples every log step."""
        samples = rollout_samples(batch, scored, self.objective.group_size)
        self.reward_guard.observe(scored.rewards, scored.parts, samples[0] if samples else {})
        step = self.samples_due()
        if step is not None:
            save_samples(self, samples[: self.objective.samples_per_log], step)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy completions of held-out prompts, scored by the same reward functions."""
        texts = self.sample(batch, 1, greedy=True).texts
        rewards, parts = self.score(batch, texts, 1)
        size = rewards.numel()
        self.log("val/reward_mean", rewards.mean(), prog_bar=True, batch_size=size)
        for key, scores in parts.items():
            self.log(f"val/reward_{key}", scores.float().mean(), batch_size=size)


class GRPOModule(ScoredRolloutModule):
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
            reward_functions,
            tokenizer,
            gradient_clip_val,
            needs_reference=objective.beta > 0,
        )
        # dynamic_sampling=resample's prompts (group_rollout_setup sets them) and its place in them
        self.extra_prompts: Any = None
        self.extra_batches: Any = iter(())

    # rollouts

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        objective = self.objective
        scored = self.sample_scored(batch)
        if objective.mask_truncated_completions:
            # no EOS: cut off at max_new_tokens, so its reward judges an unfinished answer
            finished = (scored.completions == self.tokenizer.eos_token_id).any(-1, keepdim=True)
            scored.mask = scored.mask & finished
        rollout = Rollout(
            **vars(scored),
            advantages=self.group_advantages(scored.rewards),
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
        trained = self.dynamic_sample(rollout)
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

    def dynamic_sample(self, rollout: Rollout) -> Rollout:
        """The rollout the update trains on (objective.dynamic_sampling; DAPO, Yu et al.
        2025): the batch (off), its groups whose rewards differ (drop), or such groups until
        the batch is full of them (resample). The counts are logged."""
        mode, group = self.objective.dynamic_sampling, self.objective.group_size
        if mode == "off":
            return rollout
        if mode == "drop":
            trained = drop_uniform_groups(rollout, group)
            self.log_counts(groups_dropped=rollout.groups_dropped)
        else:
            trained = self.resample(rollout)
        self.log_counts(groups_trained=trained.rewards.numel() // group)
        return trained

    def resample(self, rollout: Rollout) -> Rollout:
        """DAPO's dynamic sampling (Yu et al. 2025, Algorithm 1): keep the batch's groups whose
        rewards differ and roll out further batches of prompts (``extra_prompts``: the
        training prompts in a second shuffle, so the epoch's own are not used up) until as
        many such groups as the batch has prompts are gathered, at most
        ``max_resample_rounds`` batches more; short of that it trains on what it gathered
        (train/resample_bound_hit = 1), and with no such group at all on the batch whole, as
        ``drop`` does. The advantages are each batch's own (the same with scale_rewards=group
        or none)."""
        objective, group = self.objective, self.objective.group_size
        wanted = rollout.rewards.numel() // group
        kept = [varied_groups(rollout, group)]
        dropped, rounds = kept[0].groups_dropped, 0
        gathered = kept[0].rewards.numel() // group
        # every rank rolls out as many rounds (generation under FSDP gathers weights together)
        while rounds < objective.max_resample_rounds and self.any_rank(gathered < wanted):
            extra = varied_groups(self.rollout(self.next_prompts()), group)
            rounds += 1
            dropped += extra.groups_dropped
            kept.append(extra)
            gathered += extra.rewards.numel() // group
        self.log_counts(
            groups_dropped=dropped,
            groups_resampled=rounds * wanted,
            resample_rounds=rounds,
            resample_bound_hit=int(gathered < wanted),
        )
        if gathered == 0:
            return rollout
        joined = join_rollouts(kept, self.tokenizer.pad_token_id)
        rows = torch.arange(joined.rewards.numel(), device=joined.rewards.device)
        return joined.rows(rows < wanted * group)

    def next_prompts(self) -> dict[str, Any]:
        """The next batch of ``extra_prompts`` (restarted at its end), on this device."""
        batch = next(self.extra_batches, None)
        if batch is None:
            self.extra_batches = iter(self.extra_prompts)
            batch = next(self.extra_batches)
        return move_data_to_device(batch, self.device)

    def any_rank(self, decision: bool) -> bool:
        """``decision`` on any rank (this process's own without a trainer)."""
        if self._trainer is None:
            return decision
        return self.trainer.strategy.reduce_boolean_decision(decision, all=False)

    def log_counts(self, **counts: int) -> None:
        """Counts of this update (summed over ranks)."""
        for key, count in counts.items():
            self.log(f"train/{key}", float(count), batch_size=1, sync_dist=True, reduce_fx="sum")

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


def varied_groups(rollout: Rollout, group_size: int) -> Rollout:
    """The groups of ``rollout`` whose rewards differ (maybe none); the others are counted on
    the result's ``groups_dropped``."""
    uniform = uniform_groups(rollout.rewards, group_size)
    varied = rollout.rows((~uniform).repeat_interleave(group_size))
    varied.groups_dropped = int(uniform.sum())
    return varied


def join_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of several batches' rollouts, in order: prompts left-padded and
    completions right-padded (masked out) to the widest."""
    prompt_width = max(r.prompt_ids.shape[1] for r in rollouts)
    width = max(r.completions.shape[1] for r in rollouts)

    def joined(name: str, columns: int, fill: Any, left: bool = False) -> torch.Tensor:
        return torch.cat([pad_columns(getattr(r, name), columns, fill, left) for r in rollouts])

    first = rollouts[0]
    return Rollout(
        prompt_ids=joined("prompt_ids", prompt_width, pad_token_id, left=True),
        prompt_mask=joined("prompt_mask", prompt_width, 0, left=True),
        completions=joined("completions", width, pad_token_id),
        mask=joined("mask", width, False),
        texts=[text for r in rollouts for text in r.texts],
        rewards=torch.cat([r.rewards for r in rollouts]),
        parts={key: torch.cat([r.parts[key] for r in rollouts]) for key in first.parts},
        advantages=torch.cat([r.advantages for r in rollouts]),
        ref_logps=None if first.ref_logps is None else joined("ref_logps", width, 0.0),
        groups_dropped=sum(r.groups_dropped for r in rollouts),
    )


def pad_columns(tensor: torch.Tensor, columns: int, fill: Any, left: bool) -> torch.Tensor:
    """``tensor`` (rows, c) widened to ``columns`` with ``fill``, on the left or the right."""
    padding = tensor.new_full((tensor.shape[0], columns - tensor.shape[1]), fill)
    return torch.cat([padding, tensor] if left else [tensor, padding], dim=1)


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
