"""Pure loss and advantage functions for language-model training.

Every function here is stateless: it takes tensors (log-probs, logits, scores, masks) and
returns tensors, never calling a model. Shapes use ``B`` for batch, ``T`` for sequence
length and ``V`` for vocabulary size. Masks may be bool or float; a position with mask 0
contributes nothing to any loss or statistic.

Over 450 lines on purpose: it is the catalogue of every objective's loss (SFT, the 15 DPO loss
types, ORPO, SimPO/CPO, KTO, PPO, GRPO's variants, RLOO), each a few lines checked against TRL's
in the tests, sharing masked means and log-ratio helpers; one file keeps the formulas side by
side with REFERENCES.md's, where a reader compares them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# the choices, by TRL 1.16's names: declared with the config schema that checks them (DPO's
# one pure function each in DPO_LOSSES; GRPO's in aggregate_token_losses, grpo_advantages)
from lmstack.config.groups.objective import (
    DPO_LOSS_TYPES,
    GRPO_IS_LEVELS,
    GRPO_LOSS_TYPES,
    GRPO_REWARD_SCALES,
    KTO_LOSS_TYPES,
    SIMPO_LOSS_TYPES,
)


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


class DPOPairs(NamedTuple):
    """What a DPO-family loss reads, each ``(P,)``: the completion log-probs of the chosen (w)
    and rejected (l) completions under the policy and the reference, summed over tokens, and
    the completions' token counts (what the length-normalised losses divide by; 1 when the
    log-probs given are already token means)."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor | float = 1.0
    rejected_tokens: Tensor | float = 1.0

    @property
    def chosen_logratio(self) -> Tensor:
        """``rho_w = log pi(y_w|x) - log pi_ref(y_w|x)``."""
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratio(self) -> Tensor:
        """``rho_l = log pi(y_l|x) - log pi_ref(y_l|x)``."""
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> Tensor:
        """``h = rho_w - rho_l``, DPO's implicit reward margin over ``beta``."""
        return self.chosen_logratio - self.rejected_logratio

    @property
    def token_mean_margin(self) -> Tensor:
        """``rho_w / |y_w| - rho_l / |y_l|``: ``h`` on token-averaged log-probs."""
        return (
            self.chosen_logratio / self.chosen_tokens
            - self.rejected_logratio / self.rejected_tokens
        )


class DPOKnobs(NamedTuple):
    """The scalars a DPO-family loss may read: ``beta``, the label smoothing ``e`` and
    DiscoPOP's temperature ``tau``."""

    beta: float
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """``-(1 - e) logsig(z) - e logsig(-z)``: the logistic loss with labels flipped at rate e."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def dpo_sigmoid_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """DPO (Rafailov et al. 2023): ``-logsig(beta h)``; with ``e > 0`` conservative DPO
    (Mitchell 2023), ``-(1 - e) logsig(beta h) - e logsig(-beta h)``."""
    return _smoothed_logistic(knobs.beta * pairs.margin, knobs.label_smoothing)


def dpo_robust_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under preference-flip rate ``e``:
    ``((1 - e)(-logsig(beta h)) - e(-logsig(-beta h))) / (1 - 2e)``. Unlike conservative DPO
    it subtracts the flipped-label loss."""
    z, eps = knobs.beta * pairs.margin, knobs.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def dpo_ipo_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): ``(h' - 1 / (2 beta))^2`` with ``h'`` the margin of
    token-averaged log-probs (as TRL does, confirmed with the authors: a summed margin would
    grow the squared loss with completion length)."""
    return (pairs.token_mean_margin - 1 / (2 * knobs.beta)) ** 2


def dpo_hinge_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """SLiC-HF's hinge (Zhao et al. 2023) on DPO's margin: ``relu(1 - beta h)``."""
    return torch.relu(1 - knobs.beta * pairs.margin)


def dpo_exo_pair_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """EXO (Ji et al. 2024, Eq. 16) for a pair: ``KL(q || p)`` with ``q = (sig(beta h),
    sig(-beta h))`` and the smoothed labels ``p = (1 - e, e)``; needs ``e > 0``."""
    z, eps = knobs.beta * pairs.margin, knobs.label_smoothing
    chosen_term = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    return chosen_term + rejected_term


def dpo_nca_pair_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """NCA (Chen et al. 2024, noise-contrastive alignment) on rewards ``r = beta rho``:
    ``-logsig(r_w) - 0.5 logsig(-r_w) - 0.5 logsig(-r_l)``."""
    chosen, rejected = knobs.beta * pairs.chosen_logratio, knobs.beta * pairs.rejected_logratio
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def dpo_bco_pair_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """BCO (Jung et al. 2024) on pairs: ``-logsig(r_w) - logsig(-r_l)``, ``r = beta rho``.

    The paper shifts the rewards by a running mean ``delta``; TRL 1.16 dropped it (its
    ``bco_pair`` keeps no running state), and this follows TRL, so the loss stays pure."""
    chosen, rejected = knobs.beta * pairs.chosen_logratio, knobs.beta * pairs.rejected_logratio
    return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)


def dpo_sppo_hard_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """SPPO (Wu et al. 2024, Eq. 4.7) with hard win probabilities (1 for y_w, 0 for y_l):
    ``(rho_w - 1 / (2 beta))^2 + (rho_l + 1 / (2 beta))^2``."""
    target = 0.5 / knobs.beta
    return (pairs.chosen_logratio - target) ** 2 + (pairs.rejected_logratio + target) ** 2


def dpo_aot_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, alignment via optimal transport): the smoothed logistic
    loss of ``beta (sort(lw - ll) - sort(lw_ref - ll_ref))``, the policy's and reference's
    pair log-ratios each sorted over the batch (first-order stochastic dominance). The
    per-pair terms are in sorted order: only their mean is meaningful."""
    policy = torch.sort(pairs.policy_chosen - pairs.policy_rejected, dim=0).values
    reference = torch.sort(pairs.ref_chosen - pairs.ref_rejected, dim=0).values
    return _smoothed_logistic(knobs.beta * (policy - reference), knobs.label_smoothing)


def dpo_aot_unpaired_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024): the smoothed logistic loss of
    ``beta (sort(rho_w) - sort(rho_l))``, chosen and rejected log-ratios sorted separately."""
    chosen = torch.sort(pairs.chosen_logratio, dim=0).values
    rejected = torch.sort(pairs.rejected_logratio, dim=0).values
    return _smoothed_logistic(knobs.beta * (chosen - rejected), knobs.label_smoothing)


def dpo_apo_zero_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): ``1 - sig(beta rho_w) + sig(beta rho_l)``;
    raises the chosen likelihood and lowers the rejected one (chosen better than the model)."""
    beta = knobs.beta
    return (
        1
        - torch.sigmoid(beta * pairs.chosen_logratio)
        + torch.sigmoid(beta * pairs.rejected_logratio)
    )


def dpo_apo_down_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): ``sig(beta rho_w) + 1 - sig(beta h)``;
    lowers both likelihoods, the rejected one more (chosen worse than the model's own)."""
    beta = knobs.beta
    return torch.sigmoid(beta * pairs.chosen_logratio) + 1 - torch.sigmoid(beta * pairs.margin)


def dpo_discopop_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """DiscoPOP (Lu et al. 2024, Eq. 5), the log-ratio modulated loss: with ``z = beta h`` and
    ``m = sig(z / tau)``, ``(1 - m)(-logsig(z)) + m exp(-z)``."""
    z = knobs.beta * pairs.margin
    mix = torch.sigmoid(z / knobs.discopop_tau)
    return (1 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)


def dpo_sft_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """Negative log-likelihood of the chosen completions, per token over the batch:
    ``-sum log pi(y_w|x) / sum |y_w|`` (RPO, Pang et al. 2024, mixes it with ``sigmoid``); one
    scalar repeated per pair, so its mean is that value."""
    total_tokens = torch.as_tensor(pairs.chosen_tokens).expand_as(pairs.policy_chosen).sum()
    return (-pairs.policy_chosen.sum() / total_tokens).expand_as(pairs.policy_chosen)


def dpo_sigmoid_norm_loss(pairs: DPOPairs, knobs: DPOKnobs) -> Tensor:
    """Length-normalised DPO: ``-logsig(beta h')`` with ``h'`` the margin of token-averaged
    log-probs (TRL's ``sigmoid_norm``; the length normalisation SimPO, Meng et al. 2024,
    argues for, kept relative to the reference)."""
    return -F.logsigmoid(knobs.beta * pairs.token_mean_margin)


# loss_type -> per-pair loss; the names are TRL 1.16's DPOConfig.loss_type values
DPO_LOSSES: dict[str, Callable[[DPOPairs, DPOKnobs], Tensor]] = {
    "sigmoid": dpo_sigmoid_loss,
    "robust": dpo_robust_loss,
    "ipo": dpo_ipo_loss,
    "hinge": dpo_hinge_loss,
    "exo_pair": dpo_exo_pair_loss,
    "nca_pair": dpo_nca_pair_loss,
    "bco_pair": dpo_bco_pair_loss,
    "sppo_hard": dpo_sppo_hard_loss,
    "aot": dpo_aot_loss,
    "aot_unpaired": dpo_aot_unpaired_loss,
    "apo_zero": dpo_apo_zero_loss,
    "apo_down": dpo_apo_down_loss,
    "discopop": dpo_discopop_loss,
    "sft": dpo_sft_loss,
    "sigmoid_norm": dpo_sigmoid_norm_loss,
}


def as_loss_types(loss_type: str | Sequence[str]) -> list[str]:
    """``objective.loss_type`` as a list: one name, or the names of a weighted mix."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    discopop_tau: float = 0.05,
) -> dict[str, Tensor]:
    """The DPO family's loss (one of ``DPO_LOSSES``, or a weighted sum) and its diagnostics.

    Inputs are ``(P,)`` sequence log-probs of the chosen / rejected completions under the
    policy and the frozen reference, summed over tokens, and optionally their token counts
    (``ipo``, ``sigmoid_norm`` and ``sft`` average over tokens; without counts the log-probs
    are taken as token means already). Each loss is documented on its function
    (``DPO_LOSSES[name]``); with ``h = (pc - rc) - (pr - rr)``, ``sigmoid`` is
    ``-logsig(beta h)`` (Rafailov et al. 2023).

    A list ``loss_type = [a, b, ...]`` with ``loss_weights = [wa, wb, ...]`` (1 each when
    None) gives ``loss = sum_i w_i mean(loss_i)``, TRL's multi-loss combination (as in MPO,
    Wang et al. 2024).

    Returns:
        dict with ``loss`` (the scalar to minimise), ``losses`` (``(P,)``, the weighted sum of
        per-pair losses), ``chosen_rewards`` = ``beta (pc - rc)`` and ``rejected_rewards`` =
        ``beta (pr - rr)`` (both detached, from summed log-probs), ``margins`` = chosen minus
        rejected reward, and ``accuracy`` = share of pairs whose chosen reward is higher.

    Raises:
        ValueError: on ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5)`` (or 0 with
            ``exo_pair``), an unknown ``loss_type`` or as many weights as loss types.
    """
    loss_types = as_loss_types(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    unknown = [name for name in loss_types if name not in DPO_LOSSES]
    if unknown or not loss_types:
        raise ValueError(
            f"dpo_loss: unknown loss_type {loss_type!r}; choose from {', '.join(DPO_LOSS_TYPES)}"
        )
    if len(weights) != len(loss_types):
        raise ValueError(
            f"dpo_loss: {len(weights)} loss_weights for {len(loss_types)} loss types {loss_types}"
        )
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError("dpo_loss: exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")

    pairs = DPOPairs(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        1.0 if chosen_tokens is None else chosen_tokens,
        1.0 if rejected_tokens is None else rejected_tokens,
    )
    knobs = DPOKnobs(beta, label_smoothing, discopop_tau)
    per_loss = [DPO_LOSSES[name](pairs, knobs) for name in loss_types]
    losses = sum(weight * part for weight, part in zip(weights, per_loss, strict=True))
    loss = sum(weight * part.mean() for weight, part in zip(weights, per_loss, strict=True))

    chosen_rewards = beta * pairs.chosen_logratio.detach()
    rejected_rewards = beta * pairs.rejected_logratio.detach()
    return {
        "loss": loss,
        "losses": losses,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation (Mächler 2012): ``log1p(-exp(x))``
    below ``-log 2``, ``log(-expm1(x))`` above it, where ``exp(x)`` is close to 1."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def _preference_diagnostics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """The logged rewards of a reference-free loss (detached), their margins and the share of
    pairs whose chosen reward is the higher one."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }


def orpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, chosen_nll: Tensor, beta: float
) -> dict[str, Tensor]:
    """Odds Ratio Preference Optimisation (Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model"): SFT and preference in one loss, no reference model.

    Inputs are ``(P,)`` token-averaged log-probs ``lc``, ``lr`` of the chosen and rejected
    completions and ``chosen_nll``, the mean cross-entropy of the chosen completions' tokens.
    With ``odds(y) = p / (1 - p)`` taken in log space (``log1mexp(l) = log(1 - exp(l))``)::

        log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
        loss     = chosen_nll + beta * mean(-logsig(log_odds))

    ``beta`` is the paper's lambda (TRL's ``ORPOConfig.beta``, default 0.1).

    Returns:
        dict with ``loss``; ``losses`` (``(P,)``, the odds-ratio term ``-logsig(log_odds)``);
        ``nll``; ``log_odds`` (``(P,)``, detached); ``chosen_rewards`` = ``beta lc`` and
        ``rejected_rewards`` = ``beta lr`` (detached, as TRL logs them), ``margins`` and
        ``accuracy`` (share of pairs with ``lc > lr``).

    Raises:
        ValueError: on ``beta <= 0`` (0 would be plain SFT).
    """
    if beta <= 0:
        raise ValueError(f"orpo_loss: beta must be > 0, got {beta}")
    chosen, rejected = policy_chosen.float(), policy_rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -F.logsigmoid(log_odds)
    return {
        "loss": chosen_nll + beta * losses.mean(),
        "losses": losses,
        "nll": chosen_nll,
        "log_odds": log_odds.detach(),
        **_preference_diagnostics(beta * chosen, beta * rejected),
    }


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    beta: float,
    loss_type: str = "simpo",
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
    chosen_nll: Tensor | None = None,
    cpo_alpha: float = 0.0,
) -> dict[str, Tensor]:
    """SimPO or CPO: a preference loss on the policy's own log-probs, no reference model.

    Inputs are ``(P,)`` log-probs ``lc``, ``lr`` of the chosen and rejected completions; with
    ``e`` the label smoothing and ``z`` the margin below, the per-pair loss is
    ``-(1 - e) logsig(z) - e logsig(-z)``:

    - ``"simpo"`` (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
      Reference-Free Reward"): ``z = beta (lc - lr) - gamma`` with ``gamma = gamma_beta_ratio
      * beta`` the target reward margin; ``lc``, ``lr`` token-averaged (length-normalised).
    - ``"cpo"`` (Xu et al. 2024, "Contrastive Preference Optimization"): ``z = beta (lc - lr)``
      on summed log-probs: DPO with the reference dropped; ``gamma_beta_ratio`` is unused.

    ``loss = mean(per-pair loss) + cpo_alpha * chosen_nll``: the behaviour-cloning term on the
    chosen completions' mean token cross-entropy (CPO's, ``cpo_alpha`` 1; optional for SimPO).
    This is TRL's ``CPOTrainer.cpo_loss`` with ``simpo_gamma = gamma_beta_ratio * beta``.

    Returns:
        dict with ``loss``; ``losses`` (``(P,)``); ``nll`` (0 without ``chosen_nll``);
        ``chosen_rewards`` = ``beta lc``, ``rejected_rewards`` = ``beta lr`` (detached),
        ``margins`` and ``accuracy``.

    Raises:
        ValueError: on ``beta <= 0``, a negative ``gamma_beta_ratio`` or ``cpo_alpha``,
            ``label_smoothing`` outside ``[0, 0.5)``, an unknown ``loss_type``, or
            ``cpo_alpha > 0`` without ``chosen_nll``.
    """
    if beta <= 0:
        raise ValueError(f"simpo_loss: beta must be > 0, got {beta}")
    if gamma_beta_ratio < 0 or cpo_alpha < 0:
        raise ValueError("simpo_loss: gamma_beta_ratio and cpo_alpha must be >= 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"simpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in SIMPO_LOSS_TYPES:
        raise ValueError(f"simpo_loss: unknown loss_type {loss_type!r}; one of {SIMPO_LOSS_TYPES}")
    if cpo_alpha > 0 and chosen_nll is None:
        raise ValueError("simpo_loss: cpo_alpha > 0 needs chosen_nll")

    chosen, rejected = policy_chosen.float(), policy_rejected.float()
    margin = beta * (chosen - rejected)
    if loss_type == "simpo":
        margin = margin - gamma_beta_ratio * beta
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    nll = chosen_nll if chosen_nll is not None else losses.new_zeros(())
    return {
        "loss": losses.mean() + cpo_alpha * nll,
        "losses": losses,
        "nll": nll,
        **_preference_diagnostics(beta * chosen, beta * rejected),
    }


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point before clamping: ``mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)]``
    over mismatched pairs (x_i with another row's completion y'_i), detached.

    A biased but cheap estimate of KL(pi || pi_ref) (Ethayarajh et al. 2024, sec. 4.1);
    under DDP average it over ranks before :func:`kto_loss`, as TRL gathers it.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> dict[str, Tensor]:
    """Kahneman-Tversky Optimisation loss (Ethayarajh et al. 2024, "KTO: Model Alignment as
    Prospect Theoretic Optimization", eq. 7) on unpaired rows, and its diagnostics.

    Inputs are ``(B,)`` sequence log-probs of each row's completion under the policy and the
    reference, ``desirable`` ``(B,)`` bool (thumbs up) and ``kl`` from :func:`kto_kl_estimate`.
    With ``r = policy - ref``, ``z0 = max(0, kl)`` (no gradient), ``s`` the logistic and
    ``lD``, ``lU`` the desirable and undesirable weights, the per-row loss is:

    - ``"kto"``: ``lD (1 - s(beta (r - z0)))`` for a desirable row,
      ``lU (1 - s(beta (z0 - r)))`` for an undesirable one;
    - ``"apo_zero_unpaired"`` (D'Oosterlinck et al. 2024, APO-zero without pairs, no z0):
      ``lD (1 - s(beta r))`` and ``lU s(beta r)``.

    ``loss`` is the mean over the B rows (not a weighted mean), as TRL's KTOTrainer.

    Returns:
        dict with ``loss``, ``losses`` ``(B,)`` in input order, ``kl`` (z0), ``rewards``
        ``beta r`` (detached), ``margin`` (mean desirable minus mean undesirable reward; 0
        when either is absent) and ``accuracy``: the share of (desirable, undesirable) row
        pairs in the batch whose desirable reward is higher, a tie counting half (0.5 when
        either is absent).

    Raises:
        ValueError: on ``beta <= 0``, a negative weight or an unknown ``loss_type``.
    """
    if beta <= 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("kto_loss: desirable_weight and undesirable_weight must be >= 0")
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(
            f"kto_loss: unknown loss_type {loss_type!r}; choose one of {KTO_LOSS_TYPES}"
        )

    desirable = desirable.bool()
    logratio = policy_logps - ref_logps
    z0 = kl.detach().clamp(min=0) if loss_type == "kto" else torch.zeros_like(kl)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    if loss_type == "kto":
        undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    else:
        undesirable_losses = undesirable_weight * torch.sigmoid(beta * logratio)
    losses = torch.where(desirable, desirable_losses, undesirable_losses)

    rewards = beta * logratio.detach()
    return {
        "loss": losses.mean(),
        "losses": losses,
        "kl": z0,
        "rewards": rewards,
        **_unpaired_reward_stats(rewards, desirable),
    }


def _unpaired_reward_stats(rewards: Tensor, desirable: Tensor) -> dict[str, Tensor]:
    """Margin and pairwise accuracy (an AUC) of desirable over undesirable rewards."""
    good, bad = rewards[desirable], rewards[~desirable]
    if good.numel() == 0 or bad.numel() == 0:
        return {"margin": rewards.new_zeros(()), "accuracy": rewards.new_tensor(0.5)}
    difference = good[:, None] - bad[None, :]
    wins = (difference > 0).float() + 0.5 * (difference == 0).float()
    return {"margin": good.mean() - bad.mean(), "accuracy": wins.mean()}


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


def grpo_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-4, scale: str = "group"
) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath), with TRL's ``scale_rewards``.

    For ``rewards`` ``(N,)`` laid out as ``N / group_size`` consecutive groups,
    ``A_i = (r_i - mean(group)) / (s + eps)`` where ``s`` is, by ``scale``:

    - ``group``: the group's sample standard deviation (Bessel-corrected, as in DeepSeekMath
      and TRL);
    - ``batch``: the whole batch's sample standard deviation (PPO Lite, Liu et al. 2025);
    - ``none``: no division, ``A_i = r_i - mean(group)`` (Dr. GRPO, Liu et al. 2025: dividing
      by the std over-weights questions that are too easy or too hard).

    Raises:
        ValueError: if ``rewards`` is not 1-D, ``group_size < 2``, ``N % group_size != 0`` or
            ``scale`` is none of the above.
    """
    if rewards.dim() != 1:
        raise ValueError(f"grpo_advantages: rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"grpo_advantages: group_size must be >= 2, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"grpo_advantages: {rewards.numel()} rewards do not split into groups of {group_size}"
        )
    if scale not in GRPO_REWARD_SCALES:
        raise ValueError(f"grpo_advantages: scale must be one of {GRPO_REWARD_SCALES}, got {scale}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    std = groups.std(dim=1, keepdim=True) if scale == "group" else rewards.std()
    return (centred / (std + eps)).reshape(-1)


def uniform_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``(N / group_size,)`` bool: the groups whose rewards are all equal.

    Their group-relative advantages are all zero, so they carry no policy gradient; DAPO's
    dynamic sampling (Yu et al. 2025) drops them from the batch.
    """
    groups = rewards.view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1)


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), as TRL's
    ``get_soft_overlong_punishment``, times ``factor``.

    With ``L = max_length`` and ``C = buffer``, a completion of ``n`` tokens gets ``0`` when
    ``n <= L - C``, ``((L - C) - n) / C`` when ``L - C < n <= L`` and ``-1`` beyond ``L``: a
    ramp rather than a cliff at truncation. ``buffer = 0`` gives no penalty.
    """
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    ramp = ((max_length - buffer) - lengths) / buffer
    penalty = torch.where(lengths <= max_length - buffer, torch.zeros_like(ramp), ramp)
    return factor * torch.where(lengths > max_length, torch.full_like(ramp, -1.0), penalty)


def importance_log_weights(
    logps: Tensor, old_logps: Tensor, mask: Tensor, level: str = "token"
) -> Tensor:
    """Log importance weights of the policy against the sampling policy.

    ``token`` (PPO, GRPO): ``log rho_t = logps_t - old_logps_t``, ``(N, T)``.
    ``sequence`` (GSPO, Zheng et al. 2025): one length-normalised ratio per sequence,
    ``log s_i = mean_t (logps_t - old_logps_t)`` over its valid tokens, ``(N, 1)``, applied
    to every token as TRL does: its variance does not grow with the sequence's length.
    """
    log_ratio = logps - old_logps.detach()
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"importance sampling level must be one of {GRPO_IS_LEVELS}, got {level}")
    mask = mask.to(log_ratio.dtype)
    per_sequence = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_sequence.unsqueeze(-1)


def aggregate_token_losses(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items: Tensor | None = None,
) -> Tensor:
    """Reduce ``(N, T)`` token losses ``l`` with mask ``m`` to a scalar, by ``loss_type``
    (TRL 1.16's names and formulas):

    - ``grpo`` (Shao et al. 2024): ``mean_i (sum_t l_it m_it / sum_t m_it)``; every sequence
      weighs the same, so each token of a long one counts less (a length bias);
    - ``dapo`` (Yu et al. 2025): ``sum_it l_it m_it / num_items``; every token weighs the
      same; ``num_items`` is the whole (accumulated) batch's token count, by default
      ``sum m`` of this batch;
    - ``bnpo``: ``sum_it l_it m_it / sum_it m_it`` over this (local) batch; equals ``dapo``
      without gradient accumulation across batches;
    - ``dr_grpo`` (Liu et al. 2025): ``sum_it l_it m_it / (N * max_completion_length)``, a
      constant divisor, so neither lengths nor token counts rescale the gradient.
    """
    mask = mask.to(per_token_loss.dtype)
    if loss_type == "grpo":
        return _sequence_then_batch_mean(per_token_loss, mask)
    total = (per_token_loss * mask).sum()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dapo":
        count = mask.sum() if num_items is None else num_items.to(total.dtype)
        return total / count.clamp(min=1.0)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length (the completion budget)")
        return total / (per_token_loss.shape[0] * max_completion_length)
    raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type}")


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    beta: float,
    clip_eps_high: float | None = None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
) -> dict[str, Tensor]:
    """GRPO objective (Shao et al. 2024) with the k3 KL estimator, and its variants as in
    TRL 1.16's ``GRPOTrainer._compute_loss``.

    Per token, with ``A`` the ``(N,)`` sequence advantage broadcast over tokens:
    ``rho = exp(w)`` with ``w`` from :func:`importance_log_weights` (per token, or GSPO's
    per-sequence mean, Zheng et al. 2025),
    ``s = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` (DAPO's clip-higher, Yu et al.
    2025, when ``clip_eps_high > clip_eps``; symmetric when None),
    ``d = ref_logps - logps``, ``kl = exp(d) - d - 1`` (unbiased, non-negative estimate of
    KL(policy || ref)) and ``l = -(s - beta kl)``. :func:`aggregate_token_losses` reduces
    ``l`` by ``loss_type``; ``grpo`` (the default, for existing callers) averages over each
    sequence's valid tokens, then over sequences, as in the GRPO paper.

    Returns:
        dict with ``loss``, ``kl`` (per-sequence-then-batch average, detached) and
        ``clip_fraction`` (fraction of valid tokens where the clipped term is the smaller).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_weights = importance_log_weights(logps, old_logps, mask, importance_sampling_level)
    ratio = torch.exp(log_weights)
    adv = advantages.detach().unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
    surrogate = torch.minimum(unclipped, clipped)
    log_ref_ratio = ref_logps.detach() - logps
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
    per_token_loss = -(surrogate - beta * kl)
    with torch.no_grad():
        mean_kl = _sequence_then_batch_mean(kl, mask)
        # a sequence-level ratio is (N, 1): count it once per valid token
        was_clipped = (clipped < unclipped).to(ratio.dtype).expand_as(logps)
        clip_fraction = _masked_mean(was_clipped, mask)
    return {
        "loss": aggregate_token_losses(per_token_loss, mask, loss_type, max_completion_length),
        "kl": mean_kl,
        "clip_fraction": clip_fraction,
    }


def rloo_kl_rewards(
    rewards: Tensor, old_logps: Tensor, ref_logps: Tensor, mask: Tensor, beta: float
) -> Tensor:
    """RLOO's KL-penalised rewards (Ahmadian et al. 2024), as TRL's RLOOTrainer:
    ``r_i - beta sum_t m_it (old_logps_it - ref_logps_it)``, the first-order (k1) KL estimate
    of the sampling policy summed over the completion; detached."""
    kl = ((old_logps - ref_logps) * mask.to(old_logps.dtype)).sum(-1)
    return (rewards - beta * kl).detach()


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024; Kool et al. 2019).

    For the ``k = group_size`` samples of a prompt (consecutive rows of ``rewards`` ``(N,)``),
    ``A_i = r_i - (1 / (k - 1)) sum_{j != i} r_j``: each sample's baseline is its siblings'
    mean, so it is independent of the sample and the gradient estimate stays unbiased.
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages: group_size must be >= 2, got {group_size}")
    groups = rewards.view(-1, group_size)
    baselines = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baselines).reshape(-1)


def rloo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
) -> dict[str, Tensor]:
    """RLOO's clipped sequence-level objective, as TRL's ``RLOOTrainer._compute_loss``.

    With ``S_i = sum_t m_it logps_it`` (and ``S_old`` alike), ``rho_i = exp(S_i - S_old_i)``
    and ``loss = mean_i -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)``; the KL
    is in the rewards (:func:`rloo_kl_rewards`), not here.

    Returns:
        dict with ``loss`` and ``clip_fraction`` (fraction of sequences clipped).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logps.dtype)
    log_ratio = (logps * mask).sum(-1) - (old_logps.detach() * mask).sum(-1)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = (clipped < unclipped).to(ratio.dtype).mean()
    return {"loss": loss, "clip_fraction": clip_fraction}
