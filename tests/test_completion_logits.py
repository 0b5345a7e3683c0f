"""SFT computes logits only where a target token is predicted (the vocabulary projection of
prompt and padding positions is skipped); the loss and its gradients are those of the full
logits' cross-entropy, for padded and packed batches."""

from __future__ import annotations

import pytest
import torch

from lmstack.data.loading import collate_packed, collate_padded
from lmstack.objectives.causal_lm import CausalLMModule
from lmstack.objectives.losses import causal_lm_loss


@pytest.fixture(scope="module")
def module(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa")
    return CausalLMModule(model, objective=None, total_steps=1)


def examples() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in ((12, 5), (9, 3), (15, 10)):
        ids = torch.randint(5, 300, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_completion_only_logits_give_the_full_loss_and_gradients(module, collate):
    batch = collate_packed(examples()) if collate == "packed" else collate_padded(examples(), 0)
    model = module.model

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    full, full_grads = loss_and_grads(lambda: causal_lm_loss(module(batch), batch["labels"]))
    kept, kept_grads = loss_and_grads(lambda: -module.target_logprobs(batch).mean())
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    for got, want in zip(kept_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_dpo_sequence_logprobs_from_completion_logits_match_the_full_ones(module, collate, average):
    from lmstack.objectives.dpo import completion_sequence_logprobs
    from lmstack.objectives.losses import packed_sequence_logprobs, sequence_logprobs

    batch = collate_packed(examples()) if collate == "packed" else collate_padded(examples(), 0)
    with torch.no_grad():
        logits = module(batch)
        if collate == "packed":
            want = packed_sequence_logprobs(
                logits, batch["labels"], batch["position_ids"], average=average
            )
        else:
            want = sequence_logprobs(logits, batch["labels"], average=average)
        got = completion_sequence_logprobs(module.model, batch, average)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_chunked_logits_give_the_plain_loss_and_gradients(tiny_base, monkeypatch, collate, adapter):
    """Past LOGIT_CHUNK_ELEMENTS the target logits are computed (and recomputed in backward) a
    chunk at a time: the same log-probabilities and gradients, within 1e-5, as all at once."""
    from transformers import AutoModelForCausalLM

    from lmstack.models import next_token

    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa")
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0))
        for name, weight in model.named_parameters():  # LoRA's B starts at 0: give it weight
            if "lora_B" in name:
                torch.nn.init.normal_(weight, std=0.02)
    batch = collate_packed(examples()) if collate == "packed" else collate_padded(examples(), 0)
    trained = [p for p in model.parameters() if p.requires_grad]

    def logps_and_grads(chunk_elements: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(next_token, "LOGIT_CHUNK_ELEMENTS", chunk_elements)
        model.zero_grad()
        logps, _ = next_token.target_token_logprobs(model, batch)
        (-logps.mean()).backward()
        return logps.detach(), [p.grad.clone() for p in trained]

    vocabulary = next_token.vocabulary(model)
    plain, plain_grads = logps_and_grads(1 << 40)
    chunked, chunked_grads = logps_and_grads(5 * vocabulary)  # 5 tokens a chunk, 24 targets
    assert next_token.decoder_and_head(model) is not None and plain.numel() > 5
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
