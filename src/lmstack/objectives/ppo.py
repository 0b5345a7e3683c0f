"""PPO-RLHF (Ouyang et al. 2022, InstructGPT) as a LightningModule.

Per batch of prompts: sample one completion each (``model.generate`` with a KV cache), score
it with a frozen reward model (an objective=reward run), then

- per-token rewards ``r_t = -kl_coef (log pi(y_t) - log pi_ref(y_t)) + [t last] * score``;
- GAE over the completion tokens: ``delta_t = r_t + gamma V_{t+1} - V_t``,
  ``A_t = delta_t + gamma lam A_{t+1}``, returns ``R_t = A_t + V_t``; advantages whitened;
- ``ppo_epochs`` updates of ``L = L_clip + vf_coef L_V`` with the clipped surrogate
  ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` and the clipped value loss.

The value head is ``nn.Linear(hidden, 1)`` on the policy's last hidden states (the trunk is
shared). The reference is the policy with its adapter off, or a frozen copy after full
fine-tuning. Optimisation is manual, so ``trainer.max_steps`` counts updates. The old
log-probs and values are the first update's forward pass: the weights have not moved yet,
so they equal a separate no-grad pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmstack.models.export import save_artifacts
from lmstack.models.next_token import adamw_with_schedule
from lmstack.objectives import Objective, ObjectiveSetup
from lmstack.objectives.losses import (
    gae_advantages,
    kl_penalty_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from lmstack.objectives.reference import keep_frozen_in_eval, reference_of
from lmstack.objectives.reward import load_reward_model
from lmstack.objectives.reward_functions import save_samples
from lmstack.objectives.rollout import (
    RolloutModule,
    Sampled,
    completion_forward,
    completion_logprobs,
    prompt_setup,
)

VALUE_HEAD = "value_head.safetensors"


def setup(config: Any, loaded: Any, rows: Any) -> ObjectiveSetup:
    """Prompt batches (left-padded, chat-rendered), the reward model and the PPO module."""
    module = PPOModule(
        loaded.model,
        loaded.tokenizer,
        load_reward_model(config.objective.reward_model),
        config.objective,
        config.trainer.max_steps,
        config.trainer.gradient_clip_val,
    )
    return prompt_setup(config, loaded, rows, module)


@dataclass
class Rollout(Sampled):
    """One sampled completion per prompt, with what PPO needs that does not change."""

    scores: torch.Tensor  # (B,) reward-model score
    ref_logps: torch.Tensor  # (B, L)


@dataclass
class Targets:
    """Fixed for a batch's updates: the behaviour policy's log-probs and values, and GAE."""

    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor
    kl: torch.Tensor  # (B, L) per-token log pi - log pi_ref


class PPOModule(RolloutModule):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        reward_model: torch.nn.Module,
        objective: Any,
        total_steps: int,
        gradient_clip_val: float = 0.0,
    ):
        super().__init__(model, objective, total_steps, tokenizer, gradient_clip_val)
        self.value_head = torch.nn.Linear(model.config.hidden_size, 1)
        # start from V = 0: a random head would add noise to the first advantages
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.reward_model = reward_model

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_in_eval(self.reward_model)
        return self

    # rollouts

    def score(self, batch: dict[str, Any], texts: list[str]) -> torch.Tensor:
        """``(B,)`` reward-model scores of the decoded completions."""
        return self.reward_model.score(batch["prompt"], texts).to(self.device)

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        sampled = self.sample(batch, 1)
        with reference_of(self.model, self.reference) as reference:
            ref_logps = completion_logprobs(
                reference,
                sampled.prompt_ids,
                sampled.prompt_mask,
                sampled.completions,
                sampled.mask,
                self.objective.temperature,
            )
        scores = self.score(batch, sampled.texts)
        return Rollout(**vars(sampled), scores=scores, ref_logps=ref_logps)

    def policy_outputs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps, values)``, each ``(B, L)``: ``logps[:, t]`` of completion token ``t`` and
        ``values[:, t] = V(prompt + completion[:t])``, both read at the column before token ``t``.
        """
        # the ratio and the KL are those of the sampling policy, softmax(logits / temperature)
        logps, output = completion_forward(
            self.model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completions,
            rollout.mask,
            self.objective.temperature,
            output_hidden_states=True,
        )
        start = rollout.prompt_ids.shape[1] - 1
        hidden = output.hidden_states[-1][:, start:-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logps, values

    def targets(self, rollout: Rollout, logps: torch.Tensor, values: torch.Tensor) -> Targets:
        objective = self.objective
        rewards, kl = kl_penalty_rewards(
            logps, rollout.ref_logps, rollout.scores, rollout.mask, objective.kl_coef
        )
        advantages, returns = gae_advantages(
            rewards, values, rollout.mask, objective.gamma, objective.lam
        )
        return Targets(
            logps.detach(), values.detach(), whiten(advantages, rollout.mask), returns, kl
        )

    def save_rollout_samples(self, batch: dict[str, Any], rollout: Rollout) -> None:
        """Prompts, completions, references and reward-model scores every trainer log step
        (samples/ppo.jsonl, a W&B table, two on the console)."""
        step = self.samples_due()
        if step is None:
            return
        answers = batch.get("answer") or [None] * len(rollout.texts)
        samples = [
            {"prompt": p, "completion": t, "reference": a, "reward": float(s)}
            for p, t, a, s in zip(batch["prompt"], rollout.texts, answers, rollout.scores)
        ]
        save_samples(self, samples[:4], step)

    # optimisation

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch)
        self.save_rollout_samples(batch, rollout)
        objective, targets = self.objective, None
        for _ in range(objective.ppo_epochs):
            logps, values = self.policy_outputs(rollout)
            if targets is None:
                targets = self.targets(rollout, logps, values)
            policy = ppo_policy_loss(
                logps, targets.old_logps, targets.advantages, rollout.mask, objective.clip_eps
            )
            value_loss = ppo_value_loss(
                values, targets.old_values, targets.returns, rollout.mask, objective.value_clip_eps
            )
            self.take_update(policy["loss"] + objective.vf_coef * value_loss)
        self.publish_policy()
        self.log_update(rollout, targets, policy, value_loss)

    def log_update(self, rollout: Rollout, targets: Targets, policy: dict, value_loss) -> None:
        """The batch's rollout statistics and its last update's losses."""
        size = rollout.scores.numel()
        stats = {
            "train/reward_score": rollout.scores.mean(),
            # KL(pi || pi_ref) of a completion: its per-token log-ratios summed
            "train/kl": targets.kl.sum(-1).mean(),
            "train/policy_loss": policy["loss"].detach(),
            "train/value_loss": value_loss.detach(),
            "train/clip_fraction": policy["clip_fraction"],
            "train/approx_kl": policy["approx_kl"],
            "train/completion_length": rollout.mask.sum(-1).float().mean(),
        }
        for key, value in stats.items():
            self.log(key, value, prog_bar=key == "train/reward_score", batch_size=size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Mean reward-model score of greedy completions of held-out prompts."""
        scores = self.score(batch, self.sample(batch, 1, greedy=True).texts)
        self.log("val/reward_score", scores.mean(), prog_bar=True, batch_size=scores.numel())

    def configure_optimizers(self):
        trained = torch.nn.ModuleList([self.model, self.value_head])
        return adamw_with_schedule(trained, self.objective, self.total_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        value_head = {
            key: value
            for key, value in checkpoint["state_dict"].items()
            if key.startswith("value_head.")
        }
        super().on_save_checkpoint(checkpoint)  # the policy's trained weights
        checkpoint["state_dict"] |= value_head


def save(setup: Any, loaded: Any, config: Any, run_dir: Path) -> None:
    """The policy as any run leaves it (adapter/ or model/, merged/ when asked), with the
    value head beside it as value_head.safetensors."""
    save_artifacts(setup, loaded, config, run_dir)
    folder = run_dir / ("adapter" if config.adapter.name != "none" else "model")
    state = {
        key: value.detach().cpu() for key, value in setup.module.value_head.state_dict().items()
    }
    save_file(state, str(folder / VALUE_HEAD))


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup, save=save)
