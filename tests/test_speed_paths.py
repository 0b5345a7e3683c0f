"""The speed paths give the same numbers as the plain ones: per-sequence attention on packed
rows, and DPO's packed (padding-free) pair batches."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from lmstack.config.groups.model import ModelConfig
    from lmstack.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_base), ModelConfig())


@pytest.fixture(scope="module")
def models(tiny_base):
    """The same weights with transformers' SDPA and with lmstack's packed attention."""
    from transformers import AutoModelForCausalLM

    from lmstack.models.attention import register

    plain = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()
    packed = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=register())
    return plain, packed.eval()


def test_packed_attention_never_crosses_sequences(models):
    from lmstack.models.attention import sequence_spans

    plain, packed = models
    lengths = [7, 19, 3, 12]
    ids = torch.randint(10, 200, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    assert sequence_spans(positions, sum(lengths)) == [(0, 7), (7, 26), (26, 29), (29, 41)]
    with torch.no_grad():
        alone, start = [], 0
        for n in lengths:
            alone.append(plain(input_ids=ids[:, start : start + n], use_cache=False).logits)
            start += n
        together = packed(input_ids=ids, position_ids=positions, use_cache=False).logits
        # transformers' own block-diagonal mask agrees too
        masked = plain(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert torch.allclose(together, torch.cat(alone, dim=1), atol=1e-4)
    assert torch.allclose(together, masked, atol=1e-4)


def test_padded_batches_and_generation_are_unchanged(models):
    plain, packed = models
    ids = torch.randint(10, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        assert torch.equal(
            plain(input_ids=ids, attention_mask=mask).logits,
            packed(input_ids=ids, attention_mask=mask).logits,
        )
    generated = [m.generate(ids[:1], max_new_tokens=6, do_sample=False) for m in models]
    assert torch.equal(*generated)


def test_packed_pairs_score_like_padded_pairs(models, tokenizer):
    from lmstack.data import arith
    from lmstack.data.loading import collate_preference
    from lmstack.data.tokenize import encode_preference
    from lmstack.objectives.losses import packed_sequence_logprobs, sequence_logprobs

    _, model = models
    rng = random.Random(0)
    rows = [arith.preference_row(p, rng) for p in arith.problems(3, seed=0, held_out=True)]
    pairs = [encode_preference(row, tokenizer, max_length=64) for row in rows]
    padded = collate_preference(pairs, tokenizer.pad_token_id)
    packed = collate_preference(pairs, tokenizer.pad_token_id, packing=True)
    assert packed["input_ids"].shape[0] == 1
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # no pad tokens
    with torch.no_grad():
        for average in (False, True):
            expected = sequence_logprobs(
                model(**{k: padded[k] for k in ("input_ids", "attention_mask")}).logits,
                padded["labels"],
                average=average,
            )
            logits = model(
                input_ids=packed["input_ids"],
                position_ids=packed["position_ids"],
                use_cache=False,
            ).logits
            got = packed_sequence_logprobs(
                logits, packed["labels"], packed["position_ids"], average=average
            )
            assert got.shape == (6,)
            assert torch.allclose(got, expected, atol=1e-4), average


def test_help_lists_every_group_without_hydra(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "run.py", "--help"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    groups = [p.name for p in (root / "conf").iterdir() if p.is_dir() and p.name != "hydra"]
    for group in groups:
        assert f"  {group}=" in done.stdout
    assert "    qlora  QLoRA: LoRA on a 4-bit NF4 base" in done.stdout


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base):
    from types import SimpleNamespace

    from lmstack.config.groups.adapter import AdapterConfig
    from lmstack.config.groups.model import ModelConfig
    from lmstack.config.groups.quantization import QuantizationConfig
    from lmstack.config.groups.trainer import TrainerConfig
    from lmstack.models.loading import load_for_training

    ids = torch.randint(10, 200, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        config = SimpleNamespace(
            model=ModelConfig(source="hf", name_or_path=str(tiny_base)),
            quantization=QuantizationConfig(),
            adapter=AdapterConfig(),
            trainer=TrainerConfig(gradient_checkpointing=checkpointing),
        )
        torch.manual_seed(0)  # the same LoRA initialisation both times
        model = load_for_training(config, ".cache/lmstack").model
        assert model.is_gradient_checkpointing is checkpointing
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_gradient_checkpointing_defaults_to_on_where_the_objective_declares_it():
    """Pairwise objectives hold two sequences' activations an example (chosen and rejected,
    or online DPO's sampled pair), as TRL's configs assume; SFT, the reward model, KTO (one
    sequence a row) and PPO (its value head reads every hidden state) keep them, and GRPO and
    RLOO run each prompt once for its group instead (checkpointed layers cannot read that
    cache)."""
    from types import SimpleNamespace

    from lmstack.config.groups.trainer import TrainerConfig
    from lmstack.models.loading import wants_gradient_checkpointing

    def wants(objective: str, choice: bool | None) -> bool:
        config = SimpleNamespace(
            trainer=TrainerConfig(gradient_checkpointing=choice),
            objective=SimpleNamespace(name=objective),
        )
        return wants_gradient_checkpointing(config)

    assert all(wants(name, None) for name in ("dpo", "orpo", "simpo", "online_dpo"))
    assert not any(wants(name, None) for name in ("sft", "kto", "reward", "ppo", "grpo", "rloo"))
    assert not wants("dpo", False) and not wants("grpo", False) and wants("sft", True)


def test_packed_attention_gradients_match_with_grouped_query_heads():
    """Grouped-query heads (SmolLM2, Llama 3: fewer key/value heads than query heads) go to the
    kernel unrepeated, and split rows backpropagate like separate sequences."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmstack.models.attention import register

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config)
    config._attn_implementation = register()
    packed = LlamaForCausalLM(config)
    packed.load_state_dict(plain.state_dict())
    lengths = [5, 11, 3, 8]
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    alone, start = [], 0
    for n in lengths:
        alone.append(plain(input_ids=ids[:, start : start + n], use_cache=False).logits)
        start += n
    together = packed(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert torch.allclose(together, torch.cat(alone, dim=1), atol=1e-5)
    torch.cat(alone, dim=1).square().sum().backward()
    together.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), packed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-4), name
