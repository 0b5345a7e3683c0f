"""Tests for lmstack.objectives.losses.

Expected values are recomputed here with plain Python ``math`` and explicit loops over
``.tolist()`` data, never by calling the formula under test.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lmstack.objectives.losses import (
    causal_lm_loss,
    dpo_loss,
    gae_advantages,
    grpo_advantages,
    grpo_loss,
    kl_penalty_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    reward_bt_loss,
    sequence_logprobs,
    token_logprobs,
    whiten,
)

IGNORE = -100


def py_log_softmax_at(row: list[float], index: int) -> float:
    top = max(row)
    return row[index] - (top + math.log(sum(math.exp(v - top) for v in row)))


def py_logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def py_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float | None]]:
    """Shifted label log-probs, ``None`` where the label is ignored."""
    out = []
    for row_logits, row_labels in zip(logits.tolist(), labels.tolist(), strict=True):
        row = []
        for t in range(len(row_labels) - 1):
            target = row_labels[t + 1]
            row.append(None if target == IGNORE else py_log_softmax_at(row_logits[t], target))
        out.append(row)
    return out


@pytest.fixture
def lm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, 3, 6, 0, 2], [IGNORE, IGNORE, 4, 5, IGNORE]])
    return logits, labels


# --- token_logprobs -----------------------------------------------------------------------


def test_token_logprobs_matches_manual(lm_batch):
    logits, labels = lm_batch
    logps, mask = token_logprobs(logits, labels)
    assert logps.shape == mask.shape == (2, 4)
    expected = py_token_logps(logits, labels)
    for b in range(2):
        for t in range(4):
            want = expected[b][t]
            assert mask[b, t].item() == (0.0 if want is None else 1.0)
            assert logps[b, t].item() == pytest.approx(0.0 if want is None else want, abs=1e-9)


def test_token_logprobs_custom_ignore_index():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[0, 7, 2, 7]])
    logps, mask = token_logprobs(logits, labels, ignore_index=7)
    assert mask.tolist() == [[0.0, 1.0, 0.0]]
    assert logps[0, 0].item() == 0.0 and logps[0, 2].item() == 0.0
    want = py_log_softmax_at(logits[0, 1].tolist(), 2)
    assert logps[0, 1].item() == pytest.approx(want, abs=1e-5)


def test_token_logprobs_bf16_upcasts():
    logits = torch.randn(2, 4, 9).to(torch.bfloat16)
    labels = torch.randint(0, 9, (2, 4))
    logps, mask = token_logprobs(logits, labels)
    assert logps.dtype == mask.dtype == torch.float32
    ref, _ = token_logprobs(logits.float(), labels)
    torch.testing.assert_close(logps, ref)


def test_token_logprobs_gradient_flows_only_to_used_positions(lm_batch):
    logits, labels = lm_batch
    logits = logits.clone().requires_grad_(True)
    logps, _ = token_logprobs(logits, labels)
    logps.sum().backward()
    grad = logits.grad
    assert torch.all(grad[:, -1] == 0)  # last position predicts nothing
    assert torch.all(grad[1, 0] == 0) and torch.all(grad[1, 3] == 0)  # targets ignored
    assert grad[0, 0].abs().sum() > 0 and grad[1, 1].abs().sum() > 0
    # d/dz log softmax(z)[y] = onehot(y) - softmax(z)
    z = logits[0, 0].tolist()
    denom = sum(math.exp(v) for v in z)
    for k, g in enumerate(grad[0, 0].tolist()):
        assert g == pytest.approx((1.0 if k == 3 else 0.0) - math.exp(z[k]) / denom, abs=1e-9)


# --- causal_lm_loss / sequence_logprobs ---------------------------------------------------


def test_causal_lm_loss_matches_manual(lm_batch):
    logits, labels = lm_batch
    terms = [-v for row in py_token_logps(logits, labels) for v in row if v is not None]
    assert causal_lm_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms))


def test_causal_lm_loss_agrees_with_cross_entropy(lm_batch):
    logits, labels = lm_batch
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    torch.testing.assert_close(causal_lm_loss(logits, labels), want)


def test_causal_lm_loss_packed_equals_padded():
    gen = torch.Generator().manual_seed(1)
    vocab = 6
    seq_a = torch.randint(0, vocab, (4,), generator=gen)
    seq_b = torch.randint(0, vocab, (3,), generator=gen)
    logits_a = torch.randn(4, vocab, generator=gen, dtype=torch.float64)
    logits_b = torch.randn(3, vocab, generator=gen, dtype=torch.float64)

    # a packed sequence's first label must be ignored: it would be "predicted" across the seam
    packed_logits = torch.cat([logits_a, logits_b]).unsqueeze(0)
    packed_labels = torch.cat([seq_a, seq_b]).unsqueeze(0).clone()
    packed_labels[0, 4] = IGNORE

    pad_logits = torch.zeros(2, 4, vocab, dtype=torch.float64)
    pad_logits[0] = logits_a
    pad_logits[1, :3] = logits_b
    pad_labels = torch.full((2, 4), IGNORE)
    pad_labels[0] = seq_a
    pad_labels[1, :3] = seq_b

    packed = causal_lm_loss(packed_logits, packed_labels)
    padded = causal_lm_loss(pad_logits, pad_labels)
    assert packed.item() == pytest.approx(padded.item(), abs=1e-12)


def test_causal_lm_loss_raises_without_supervised_tokens():
    labels = torch.tensor([[5, IGNORE, IGNORE]])  # the first label is never a target
    with pytest.raises(ValueError, match="no supervised token"):
        causal_lm_loss(torch.randn(1, 3, 8), labels)


def test_causal_lm_loss_backward(lm_batch):
    logits, labels = lm_batch
    logits = logits.clone().requires_grad_(True)
    causal_lm_loss(logits, labels).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs(lm_batch, average):
    logits, labels = lm_batch
    out = sequence_logprobs(logits, labels, average=average)
    assert out.shape == (2,)
    for b, row in enumerate(py_token_logps(logits, labels)):
        kept = [v for v in row if v is not None]
        want = sum(kept) / len(kept) if average else sum(kept)
        assert out[b].item() == pytest.approx(want, abs=1e-9)


def test_sequence_logprobs_empty_row_is_zero():
    labels = torch.tensor([[0, 1, 2], [3, IGNORE, IGNORE]])
    out = sequence_logprobs(torch.randn(2, 3, 4), labels, average=True)
    assert out[1].item() == 0.0 and math.isfinite(out[0].item())


# --- dpo_loss -----------------------------------------------------------------------------

PC = [-3.0, -5.0, -2.0]
PR = [-4.0, -4.5, -6.0]
RC = [-3.5, -4.0, -2.5]
RR = [-3.8, -4.6, -5.0]


def dpo_inputs(requires_grad: bool = False) -> list[torch.Tensor]:
    return [
        torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for v in (PC, PR, RC, RR)
    ]


def py_h(i: int) -> float:
    return (PC[i] - RC[i]) - (PR[i] - RR[i])


def py_dpo(kind: str, beta: float, eps: float) -> list[float]:
    out = []
    for i in range(3):
        z = beta * py_h(i)
        if kind == "sigmoid":
            out.append(-(1 - eps) * py_logsigmoid(z) - eps * py_logsigmoid(-z))
        elif kind == "robust":
            out.append(((1 - eps) * -py_logsigmoid(z) + eps * py_logsigmoid(-z)) / (1 - 2 * eps))
        else:
            out.append((py_h(i) - 1 / (2 * beta)) ** 2)
    return out


@pytest.mark.parametrize(
    ("kind", "beta", "eps"),
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("robust", 0.3, 0.1), ("ipo", 0.2, 0.0)],
)
def test_dpo_losses_match_manual(kind, beta, eps):
    pc, pr, rc, rr = dpo_inputs()
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, label_smoothing=eps)
    want = py_dpo(kind, beta, eps)
    assert out["losses"].tolist() == pytest.approx(want, abs=1e-12)
    assert out["loss"].item() == pytest.approx(sum(want) / 3, abs=1e-12)


def test_dpo_robust_without_noise_is_plain_dpo():
    args = dpo_inputs()
    robust = dpo_loss(*args, beta=0.4, loss_type="robust")
    plain = dpo_loss(*args, beta=0.4, loss_type="sigmoid")
    torch.testing.assert_close(robust["losses"], plain["losses"])


def test_dpo_rewards_margins_accuracy():
    beta = 0.5
    out = dpo_loss(*dpo_inputs(requires_grad=True), beta=beta)
    chosen = [beta * (PC[i] - RC[i]) for i in range(3)]
    rejected = [beta * (PR[i] - RR[i]) for i in range(3)]
    assert out["chosen_rewards"].tolist() == pytest.approx(chosen)
    assert out["rejected_rewards"].tolist() == pytest.approx(rejected)
    assert out["margins"].tolist() == pytest.approx([c - r for c, r in zip(chosen, rejected)])
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    assert out["accuracy"].item() == pytest.approx(wins / 3)
    assert not out["chosen_rewards"].requires_grad and not out["margins"].requires_grad


def test_dpo_gradient_sign():
    pc, pr, rc, rr = dpo_inputs(requires_grad=True)
    dpo_loss(pc, pr, rc, rr, beta=0.1)["loss"].backward()
    # lowering the loss means raising chosen log-probs and lowering rejected ones
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing"),
        ({"beta": 0.1, "loss_type": "hinged"}, "sigmoid.*robust.*ipo"),
    ],
)
def test_dpo_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*dpo_inputs(), **kwargs)


# --- reward_bt_loss -----------------------------------------------------------------------


def test_reward_bt_loss():
    chosen, rejected = [1.0, 0.2, -0.5, 3.0], [0.0, 0.7, -0.5, -1.0]
    chosen_t = torch.tensor(chosen, dtype=torch.float64, requires_grad=True)
    out = reward_bt_loss(chosen_t, torch.tensor(rejected, dtype=torch.float64))
    diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
    assert out["loss"].item() == pytest.approx(sum(-py_logsigmoid(d) for d in diffs) / 4)
    assert out["accuracy"].item() == pytest.approx(2 / 4)  # a tie is not a win
    assert out["margin"].item() == pytest.approx(sum(diffs) / 4)
    out["loss"].backward()
    assert torch.all(chosen_t.grad < 0)


# --- gae_advantages / whiten --------------------------------------------------------------


def py_gae(rewards, values, length, gamma, lam):
    adv = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    rets = [adv[t] + values[t] if t < length else 0.0 for t in range(len(rewards))]
    return adv, rets


def test_gae_matches_manual_loop():
    rewards = [[0.1, -0.2, 0.0, 1.0], [0.5, 0.3, 9.0, 9.0]]
    values = [[0.4, 0.1, -0.3, 0.2], [0.0, 0.6, 7.0, 7.0]]  # junk after the valid prefix
    lengths = [4, 2]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    gamma, lam = 0.9, 0.8
    adv, ret = gae_advantages(
        torch.tensor(rewards), torch.tensor(values), mask, gamma=gamma, lam=lam
    )
    for b in range(2):
        want_adv, want_ret = py_gae(rewards[b], values[b], lengths[b], gamma, lam)
        assert adv[b].tolist() == pytest.approx(want_adv, abs=1e-6)
        assert ret[b].tolist() == pytest.approx(want_ret, abs=1e-6)


def test_gae_gamma_lam_one_is_monte_carlo():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 2.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([6.0, 5.0, 3.0, 0.0])
    assert adv[0].tolist() == pytest.approx([5.5, 4.75, 1.0, 0.0])


def test_gae_is_detached():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae_advantages(torch.randn(2, 3), values, torch.ones(2, 3), 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_whiten_matches_manual():
    data = [[1.0, 2.0, 100.0], [4.0, 7.0, -50.0]]
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    kept = [1.0, 2.0, 4.0, 7.0]
    mean = sum(kept) / len(kept)
    std = math.sqrt(statistics.pvariance(kept) + 1e-8)
    out = whiten(torch.tensor(data, dtype=torch.float64), mask)
    for b in range(2):
        for t in range(3):
            want = (data[b][t] - mean) / std if mask[b, t] else 0.0
            assert out[b, t].item() == pytest.approx(want)
    unshifted = whiten(torch.tensor(data, dtype=torch.float64), mask, shift_mean=False)
    assert unshifted[0, 0].item() == pytest.approx((1.0 - mean) / std + mean)
    assert unshifted[0, 2].item() == 0.0


# --- ppo ----------------------------------------------------------------------------------


def test_ppo_policy_loss_matches_manual():
    logps = [[-1.0, -0.5, -2.0], [-0.1, -3.0, -1.0]]
    old = [[-1.1, -0.9, -1.5], [-0.1, -2.0, -1.0]]
    adv = [[1.0, 2.0, -1.0], [0.5, -2.0, 3.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    eps = 0.2
    terms, clipped_count, kls = [], 0, []
    for b in range(2):
        for t in range(3):
            if not mask[b][t]:
                continue
            rho = math.exp(logps[b][t] - old[b][t])
            a = adv[b][t]
            unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            terms.append(min(unclipped, clipped))
            clipped_count += clipped < unclipped
            kls.append((rho - 1) - math.log(rho))
    logps_t = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    out = ppo_policy_loss(
        logps_t,
        torch.tensor(old, dtype=torch.float64),
        torch.tensor(adv, dtype=torch.float64),
        torch.tensor(mask),
        clip_eps=eps,
    )
    assert out["loss"].item() == pytest.approx(-sum(terms) / len(terms))
    assert out["clip_fraction"].item() == pytest.approx(clipped_count / len(terms))
    assert out["approx_kl"].item() == pytest.approx(sum(kls) / len(kls))
    out["loss"].backward()
    # token (0,1): rho = e^0.4 > 1.2 with A > 0 -> clipped, no gradient; masked token too
    assert logps_t.grad[0, 1].item() == 0.0 and logps_t.grad[1, 2].item() == 0.0
    assert logps_t.grad[0, 0].item() != 0.0


def test_ppo_value_loss_matches_manual():
    values = [[1.0, 0.0, 2.0], [0.5, -1.0, 4.0]]
    old = [[0.8, 0.5, 2.0], [0.5, 0.0, 0.0]]
    returns = [[2.0, -1.0, 1.0], [0.0, 1.0, 0.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    eps = 0.2
    terms = []
    for b in range(2):
        for t in range(3):
            if mask[b][t]:
                v, o, r = values[b][t], old[b][t], returns[b][t]
                v_clip = min(max(v, o - eps), o + eps)
                terms.append(max((v - r) ** 2, (v_clip - r) ** 2))
    loss = ppo_value_loss(
        torch.tensor(values, requires_grad=True),
        torch.tensor(old),
        torch.tensor(returns),
        torch.tensor(mask, dtype=torch.float32),
        clip_eps=eps,
    )
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms))
    assert loss.requires_grad


# --- kl_penalty_rewards -------------------------------------------------------------------


def test_kl_penalty_rewards():
    logps = [[-1.0, -2.0, -0.5, -9.0], [-0.3, -9.0, -9.0, -9.0], [-1.0, -1.0, -1.0, -1.0]]
    ref = [[-1.5, -1.0, -0.5, 0.0], [-0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    lengths = [3, 1, 0]
    scores = [2.0, -1.0, 5.0]
    coef = 0.1
    mask = torch.tensor([[1 if t < n else 0 for t in range(4)] for n in lengths])
    rewards, kl = kl_penalty_rewards(
        torch.tensor(logps), torch.tensor(ref), torch.tensor(scores), mask, kl_coef=coef
    )
    assert rewards.shape == kl.shape == (3, 4)
    for b, n in enumerate(lengths):
        for t in range(4):
            want_kl = logps[b][t] - ref[b][t] if t < n else 0.0
            want_r = -coef * want_kl + (scores[b] if t == n - 1 else 0.0)
            assert kl[b, t].item() == pytest.approx(want_kl)
            assert rewards[b, t].item() == pytest.approx(want_r)


# --- grpo ---------------------------------------------------------------------------------


def test_grpo_advantages_matches_manual():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 2.0, -1.0]
    out = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), group_size=4)
    for g in range(2):
        group = rewards[4 * g : 4 * g + 4]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        for i, r in enumerate(group):
            assert out[4 * g + i].item() == pytest.approx((r - mean) / (std + 1e-4))


def test_grpo_advantages_constant_group_is_zero():
    out = grpo_advantages(torch.tensor([3.0, 3.0, 1.0, 2.0]), group_size=2)
    assert out[:2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(6), 4, "groups of 4"),
        (torch.zeros(4), 1, ">= 2"),
        (torch.zeros(2, 2), 2, "1-D"),
    ],
)
def test_grpo_advantages_validation(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(rewards, group_size)


def test_grpo_loss_matches_manual():
    logps = [[-1.0, -0.5, -2.0, -0.7], [-0.2, -1.5, -9.0, -9.0]]
    old = [[-1.1, -0.9, -2.0, -0.6], [-0.2, -1.0, 0.0, 0.0]]
    ref = [[-1.3, -0.4, -2.5, -0.7], [-0.5, -1.5, 0.0, 0.0]]
    adv = [0.8, -1.2]
    lengths = [4, 2]
    eps, beta = 0.2, 0.05
    seq_losses, seq_kls, clipped_count = [], [], 0
    for b, n in enumerate(lengths):
        token_losses, token_kls = [], []
        for t in range(n):
            rho = math.exp(logps[b][t] - old[b][t])
            unclipped, clipped = rho * adv[b], min(max(rho, 1 - eps), 1 + eps) * adv[b]
            clipped_count += clipped < unclipped
            d = ref[b][t] - logps[b][t]
            k3 = math.exp(d) - d - 1
            token_losses.append(-(min(unclipped, clipped) - beta * k3))
            token_kls.append(k3)
        seq_losses.append(sum(token_losses) / n)
        seq_kls.append(sum(token_kls) / n)
    mask = torch.tensor([[1 if t < n else 0 for t in range(4)] for n in lengths])
    logps_t = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    out = grpo_loss(
        logps_t,
        torch.tensor(old, dtype=torch.float64),
        torch.tensor(ref, dtype=torch.float64),
        torch.tensor(adv, dtype=torch.float64),
        mask,
        clip_eps=eps,
        beta=beta,
    )
    assert out["loss"].item() == pytest.approx(sum(seq_losses) / 2)
    assert out["kl"].item() == pytest.approx(sum(seq_kls) / 2)
    assert out["clip_fraction"].item() == pytest.approx(clipped_count / sum(lengths))
    out["loss"].backward()
    assert torch.all(logps_t.grad[1, 2:] == 0)


def test_grpo_loss_on_policy_weights_sequences_equally():
    # on-policy and equal to the reference: rho = 1, kl = 0, so loss = -mean(A) whatever the
    # lengths; a token-level mean would instead weight the long sequence 3x
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    out = grpo_loss(logps, logps.detach(), logps.detach(), adv, mask, clip_eps=0.2, beta=0.1)
    assert out["loss"].item() == pytest.approx(0.0)
    assert out["kl"].item() == pytest.approx(0.0)
    out["loss"].backward()
    # d loss / d logp = -A / (len * n_seq) at rho = 1
    want = [[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.0, 0.0]]
    assert logps.grad.tolist() == [pytest.approx(row) for row in want]
