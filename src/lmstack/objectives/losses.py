"""Pure loss and advantage functions for language-model training.

Every function here is stateless: it takes tensors (log-probs, logits, scores, masks) and
returns tensors, never calling a model. Shapes use ``B`` for batch, ``T`` for sequence
length and ``V`` for vocabulary size. Masks may be bool or float; a position with mask 0
contributes nothing to any loss or statistic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Return ``sum(x * mask) / sum(mask)``; 0 when the mask is empty."""
    mask = mask.to(x.dtype)
    # clamp instead of a data-dependent check, so no host-device sync is forced
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _sequence_then_batch_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Return ``mean_b( sum_t x[b,t] m[b,t] / sum_t m[b,t] )``: every row weighs the same."""
    mask = mask.to(x.dtype)
    per_row = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_row.mean()


def _selected_logprobs(logits: Tensor, index: Tensor) -> Tensor:
    """Return ``log softmax(logits)[..., index]`` as ``logits[index] - logsumexp(logits)``.

    Rows are processed one at a time so that at most one ``(T, V)`` float temporary exists
    beyond the input, instead of a full ``(B, T, V)`` log-softmax copy (or two, for bf16).
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):
        row = row_logits.to(compute_dtype)
        picked = row.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def token_logprobs(
    logits: Tensor, labels: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the label tokens under a causal shift.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``, so with ``y = labels[:, 1:]``::

        logps[b, t] = log softmax(logits[b, t])[y[b, t]]   if y[b, t] != ignore_index
                    = 0                                    otherwise

    Args:
        logits: ``(B, T, V)`` unnormalised scores, any float dtype.
        labels: ``(B, T)`` token ids; ``ignore_index`` marks unsupervised positions.
        ignore_index: label value to mask out.

    Returns:
        ``(logps, mask)``, both ``(B, T - 1)`` in at least float32; ``mask`` is 1.0 on
        supervised tokens and 0.0 elsewhere.
    """
    shifted_logits = logits[:, :-1]
    shifted_labels = labels[:, 1:]
    keep = shifted_labels != ignore_index
    safe_labels = shifted_labels.masked_fill(~keep, 0)
    logps = _selected_logprobs(shifted_logits, safe_labels)
    logps = torch.where(keep, logps, torch.zeros_like(logps))
    return logps, keep.to(logps.dtype)


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy over every supervised token of the batch.

    ``loss = -sum_{b,t} logps[b,t] / sum_{b,t} mask[b,t]`` (see :func:`token_logprobs`).

    Averaging over tokens of the whole batch, not per row, makes a packed row holding several
    sequences give exactly the loss of those sequences padded into separate rows, provided the
    first label of each packed sequence is ``ignore_index``.

    Raises:
        ValueError: if no label in the batch is supervised.
    """
    logps, mask = token_logprobs(logits, labels, ignore_index)
    count = mask.sum()
    if count.item() == 0:
        raise ValueError(
            "causal_lm_loss: batch has no supervised token "
            f"(every shifted label equals ignore_index={ignore_index})"
        )
    return -logps.sum() / count


def sequence_logprobs(
    logits: Tensor, labels: Tensor, average: bool = False, ignore_index: int = -100
) -> Tensor:
    """Log-probability of each row's supervised tokens.

    ``out[b] = sum_t logps[b,t]``, or with ``average=True``
    ``out[b] = sum_t logps[b,t] / sum_t mask[b,t]`` (0 for a row with no supervised token).

    Returns:
        ``(B,)`` tensor.
    """
    logps, mask = token_logprobs(logits, labels, ignore_index)
    total = logps.sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1.0)


def packed_sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    position_ids: Tensor,
    average: bool = False,
    ignore_index: int = -100,
) -> Tensor:
    """:func:`sequence_logprobs` of the sequences packed side by side in one row.

    ``logits``, ``labels`` and ``position_ids`` are ``(1, T)`` rows (``logits`` with a vocab
    axis) holding N sequences; each sequence starts where ``position_ids`` is 0, and its first
    label must be ``ignore_index`` (as `collate_packed` makes it), so no token is scored from
    the previous sequence. ``out[n]`` sums (or averages) the log-probs of sequence n's tokens.

    Returns:
        ``(N,)`` tensor, in packing order.
    """
    logps, mask = token_logprobs(logits, labels, ignore_index)
    # sequence index of each shifted label position t + 1
    sequence = ((position_ids[0] == 0).cumsum(0) - 1)[1:]
    count = int((position_ids[0] == 0).sum())
    total = logps.new_zeros(count).index_add(0, sequence, logps[0])
    if not average:
        return total
    tokens = mask.new_zeros(count).index_add(0, sequence, mask[0])
    return total / tokens.clamp(min=1.0)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """Direct Preference Optimisation loss and its diagnostics.

    Inputs are ``(P,)`` sequence log-probs of the chosen / rejected completions under the
    policy and the frozen reference. With ``h = (pc - rc) - (pr - rr)`` and ``e`` the
    label smoothing, the per-pair loss is:

    - ``"sigmoid"``: ``-(1 - e) logsig(beta h) - e logsig(-beta h)``. ``e = 0`` is the DPO of
      Rafailov et al. 2023; ``e > 0`` is conservative (label-smoothed) DPO.
    - ``"robust"``: ``((1 - e)(-logsig(beta h)) - e(-logsig(-beta h))) / (1 - 2e)``, the
      unbiased loss under preference-flip rate ``e`` (Chowdhury et al. 2024). Note the minus
      on the ``e`` term: unlike conservative DPO it subtracts the flipped-label loss.
    - ``"ipo"``: ``(h - 1 / (2 beta))^2`` (Azar et al. 2023). IPO expects token-averaged
      log-probs (``sequence_logprobs(..., average=True)``); ``label_smoothing`` is ignored.

    Returns:
        dict with ``loss`` (mean over pairs), ``losses`` (``(P,)``), ``chosen_rewards`` =
        ``beta (pc - rc)`` and ``rejected_rewards`` = ``beta (pr - rr)`` (both detached),
        ``margins`` = chosen minus rejected reward, and ``accuracy`` = fraction of pairs
        whose chosen reward exceeds the rejected one.

    Raises:
        ValueError: on ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5)`` or an unknown
            ``loss_type``.
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(
            f"dpo_loss: unknown loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}"
        )

    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (
            1 - 2 * eps
        )
    else:
        losses = (h - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    return {
        "loss": losses.mean(),
        "losses": losses,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }


def reward_bt_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> dict[str, Tensor]:
    """Bradley-Terry pairwise loss for a reward model.

    ``loss = mean(-logsig(r_c - r_r))``, ``accuracy = mean(r_c > r_r)``,
    ``margin = mean(r_c - r_r)`` (detached).
    """
    diff = chosen_scores - rejected_scores
    return {
        "loss": -F.logsigmoid(diff).mean(),
        "accuracy": (diff > 0).float().mean(),
        "margin": diff.detach().mean(),
    }


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over completion tokens.

    Backwards over time, with ``m`` the mask and the value after the last valid token 0::

        delta_t = r_t + gamma m_{t+1} V_{t+1} - V_t
        A_t     = delta_t + gamma lam m_{t+1} A_{t+1}
        R_t     = A_t + V_t

    Args:
        rewards, values, mask: ``(B, T)``; valid tokens are a prefix of each row.

    Returns:
        ``(advantages, returns)``, ``(B, T)``, zero on masked positions and detached: they are
        regression / policy targets, not something to differentiate through.
    """
    mask = mask.to(values.dtype)
    rewards = rewards.detach() * mask
    values = values.detach() * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # masking here makes a padded position look like "episode over" to the step before it
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantage
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` with statistics over its masked-in entries.

    ``mu = sum(x m) / sum(m)``, ``var = sum((x - mu)^2 m) / sum(m)`` (population variance),
    ``out = (x - mu) / sqrt(var + eps)``, plus ``mu`` again when ``shift_mean=False`` (scale
    only). Masked positions are 0 in the output.
    """
    mask = mask.to(x.dtype)
    mean = _masked_mean(x, mask)
    var = _masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> dict[str, Tensor]:
    """PPO clipped surrogate objective (Schulman et al. 2017), averaged over valid tokens.

    ``rho = exp(logps - old_logps)``,
    ``loss = -mean_m(min(rho A, clip(rho, 1 - eps, 1 + eps) A))``.
    ``old_logps`` and ``advantages`` are treated as constants (detached).

    Returns:
        dict with ``loss``; ``clip_fraction``, the fraction of valid tokens where the clipped
        term is the smaller one (so the token gets no gradient); and ``approx_kl`` =
        ``mean_m((rho - 1) - log rho)``, a non-negative estimate of KL(old || new).
    """
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    with torch.no_grad():
        clip_fraction = _masked_mean((clipped < unclipped).to(ratio.dtype), mask)
        approx_kl = _masked_mean((ratio - 1.0) - log_ratio, mask)
    return {
        "loss": -_masked_mean(surrogate, mask),
        "clip_fraction": clip_fraction,
        "approx_kl": approx_kl,
    }


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> Tensor:
    """Clipped value-function loss.

    ``v_clip = clip(v, old_v - eps, old_v + eps)``,
    ``loss = 0.5 mean_m(max((v - R)^2, (v_clip - R)^2))``.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    loss = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * _masked_mean(loss, mask)


def kl_penalty_rewards(
    logps: Tensor, ref_logps: Tensor, scores: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF rewards: KL penalty on every token plus the sequence score at the end.

    ``kl_t = (logps_t - ref_logps_t) m_t``,
    ``r_t = -kl_coef kl_t + score * [t is the row's last valid token]``.

    Args:
        logps, ref_logps, mask: ``(B, T)``.
        scores: ``(B,)`` reward-model score per sequence (ignored for a row with no valid
            token).

    Returns:
        ``(rewards, kl)``, both ``(B, T)``, zero on masked positions and detached.
    """
    mask = mask.to(logps.dtype)
    kl = (logps.detach() - ref_logps.detach()) * mask
    rewards = -kl_coef * kl
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=mask.dtype)
    # position+1 weights make argmax land on the last valid token, not the first
    last = (mask * positions).argmax(dim=-1, keepdim=True)
    has_token = mask.sum(-1, keepdim=True) > 0
    end_score = torch.where(has_token, scores.detach().to(rewards.dtype).unsqueeze(-1), 0.0)
    rewards = rewards.scatter_add(1, last, end_score)
    return rewards, kl


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath).

    For ``rewards`` ``(N,)`` laid out as ``N / group_size`` consecutive groups,
    ``A_i = (r_i - mean(group)) / (std(group) + eps)`` where ``std`` is the sample standard
    deviation (Bessel-corrected, ``torch.std`` default), as in DeepSeekMath and TRL.

    Raises:
        ValueError: if ``rewards`` is not 1-D, ``group_size < 2`` or ``N % group_size != 0``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"grpo_advantages: rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"grpo_advantages: group_size must be >= 2, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"grpo_advantages: {rewards.numel()} rewards do not split into groups of {group_size}"
        )
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    beta: float,
) -> dict[str, Tensor]:
    """GRPO objective (Shao et al. 2024) with the k3 KL estimator.

    Per token, with ``A`` the ``(N,)`` sequence advantage broadcast over tokens:
    ``rho = exp(logps - old_logps)``, ``s = min(rho A, clip(rho, 1 - eps, 1 + eps) A)``,
    ``d = ref_logps - logps``, ``kl = exp(d) - d - 1`` (unbiased, non-negative estimate of
    KL(policy || ref)) and ``l = -(s - beta kl)``. The loss averages ``l`` over each
    sequence's valid tokens, then over sequences, as in the GRPO paper.

    Returns:
        dict with ``loss``, ``kl`` (same per-sequence-then-batch average, detached) and
        ``clip_fraction`` (fraction of valid tokens where the clipped term is the smaller).
    """
    ratio = torch.exp(logps - old_logps.detach())
    adv = advantages.detach().unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    surrogate = torch.minimum(unclipped, clipped)
    log_ref_ratio = ref_logps.detach() - logps
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
    per_token_loss = -(surrogate - beta * kl)
    with torch.no_grad():
        mean_kl = _sequence_then_batch_mean(kl, mask)
        clip_fraction = _masked_mean((clipped < unclipped).to(ratio.dtype), mask)
    return {
        "loss": _sequence_then_batch_mean(per_token_loss, mask),
        "kl": mean_kl,
        "clip_fraction": clip_fraction,
    }
