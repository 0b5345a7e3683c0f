"""objective=dpo: pair batching, the adapter-off reference, a run end to end, bad input."""

from __future__ import annotations

import itertools
import json
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import FAST, assert_rejected_early, run_cli, run_dirs, run_one

OBJECTIVE = SimpleNamespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from lmstack.config.groups.model import ModelConfig
    from lmstack.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_base), ModelConfig())


@pytest.fixture(scope="module")
def pairs(tokenizer):
    from lmstack.data import arith
    from lmstack.data.tokenize import encode_preference

    rng = random.Random(0)
    rows = [arith.preference_row(p, rng) for p in arith.problems(4, seed=0, held_out=True)]
    return [encode_preference(row, tokenizer, max_length=64) for row in rows]


def load_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def storages(module: torch.nn.Module) -> set[int]:
    tensors = itertools.chain(module.parameters(), module.buffers())
    return {tensor.untyped_storage().data_ptr() for tensor in tensors}


def test_one_batch_scores_pairs_like_single_rows(tiny_base, tokenizer, pairs):
    from lmstack.data.loading import collate_padded, collate_preference
    from lmstack.objectives.dpo import DPOModule
    from lmstack.objectives.losses import sequence_logprobs

    module = DPOModule(load_base(tiny_base), OBJECTIVE, total_steps=1)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        chosen, rejected = module.sequence_logps(module.model, collate_preference(pairs, pad))
        for index, pair in enumerate(pairs):
            for side, batched in (("chosen", chosen), ("rejected", rejected)):
                alone = collate_padded([pair[side]], pad)
                logits = module.model(input_ids=alone["input_ids"]).logits
                single = sequence_logprobs(logits, alone["labels"])[0]
                assert torch.allclose(batched[index], single, atol=1e-5), (side, index)
    assert (chosen != rejected).all()


def test_lora_reference_is_the_base_without_a_second_copy(tiny_base, tokenizer, pairs):
    from peft import LoraConfig, get_peft_model

    from lmstack.data.loading import collate_preference
    from lmstack.objectives.dpo import DPOModule
    from lmstack.objectives.losses import sequence_logprobs

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    policy = get_peft_model(load_base(tiny_base), config)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # B starts at zero; move it so policy and base differ
                param.normal_(0, 0.5)
    module = DPOModule(policy, OBJECTIVE, total_steps=1).train()
    batch = collate_preference(pairs, tokenizer.pad_token_id)

    ref_chosen, ref_rejected = module.reference_logps(batch)
    with torch.no_grad():
        logits = load_base(tiny_base)(**{k: batch[k] for k in ("input_ids", "attention_mask")})
        base = sequence_logprobs(logits.logits, batch["labels"])
        policy_chosen, _ = module.sequence_logps(policy, batch)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), base, atol=1e-5)
    assert not torch.allclose(policy_chosen, ref_chosen, atol=1e-3)
    assert policy.training, "the reference pass must restore the policy's mode"
    assert storages(module) == storages(policy)


def test_full_finetuning_reference_is_a_frozen_copy(tiny_base):
    from lmstack.objectives.dpo import DPOModule

    model = load_base(tiny_base).requires_grad_(True)
    module = DPOModule(model, OBJECTIVE, total_steps=1).train()
    assert storages(module.reference).isdisjoint(storages(model))
    assert not any(p.requires_grad for p in module.reference.parameters())
    assert not module.reference.training


def test_dpo_end_to_end_reports_held_out_preference_accuracy(tmp_path):
    # one thread: with the CPU shared, torch's spinning threads make this run ~30x slower
    run_dir, metrics = run_one(
        *FAST, "objective=dpo", "logger=none", "trainer.num_threads=1", output_dir=tmp_path
    )
    assert 0.0 <= metrics["val/reward_accuracy"] <= 1.0
    for key in ("val/loss", "train/loss", "train/reward_margin", "train/logps_chosen"):
        assert key in metrics, key
    assert (run_dir / "adapter").is_dir()


def test_non_positive_beta_is_rejected(tmp_path):
    result = run_cli("objective=dpo", "objective.beta=0", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "objective.beta: must be > 0")


def test_preference_row_missing_rejected_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1 + 1?", "chosen": "2", "rejected": "3"}] * 2 + [
        {"prompt": "2 + 2?", "chosen": "4"}
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_cli(
        "objective=dpo", "data=jsonl", f"data.path={path}", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, f"{path}:3", "row is missing rejected")


def test_beta_sweep_computes_reference_logprobs_once(tmp_path):
    """precompute_ref=true: the first point runs the reference, the others read the cache."""
    run_cli(
        "-m",
        "objective=dpo",
        "objective.beta=0.05,0.1,0.5",
        "objective.precompute_ref=true",
        f"paths.ref_logps_dir={tmp_path / 'ref'}",
        *FAST,
        "logger=none",
        "trainer.num_threads=1",
        output_dir=tmp_path / "out",
    )
    points = [json.loads((d / "metrics.json").read_text()) for d in run_dirs(tmp_path / "out")]
    assert len(points) == 3
    assert sorted(p["ref/cache_hit"] for p in points) == [False, True, True]
    passes = sorted(p["ref/passes"] for p in points)
    assert passes[:2] == [0, 0] and passes[2] > 0  # one point's reference passes in all


@pytest.mark.slow
def test_dpo_lifts_held_out_preference_accuracy(tmp_path):
    """DPO straight from tiny_base lifts held-out preference accuracy from 0.5 (chance) to >= 0.8.

    Full fine-tuning (adapter=none), lr 2e-4, beta 0.1, sigmoid loss, 300 steps of 32 pairs,
    default seeds: measured 0.965 on the 200 held-out pairs with tiny_base build 3 (margin
    0.165; 0.860 on build 2, whose pretraining lacked the answer sentence), about 2 minutes on
    2 cores. By error kind on build 2 (arith.wrong_solution): wrong operation 1.00, answer sentence
    disagreeing with the equation 0.90, operand copied wrongly 0.85, result off by 1-3 0.69.

    Measured alongside: lr 3e-4 gives 0.81, batch 16 at lr 2e-4 gives 0.80 and at 5e-4 0.775
    (both log-probs fall, and the off-by-k pairs drop below chance); LoRA gives 0.735-0.76,
    beta 0.5 0.71, ipo 0.735, and starting from a 500-step SFT run 0.705.
    """
    _, metrics = run_one(
        "objective=dpo",
        "adapter=none",
        "objective.lr=2e-4",
        "objective.beta=0.1",
        "trainer.max_steps=300",
        "data.batch_size=32",
        "verify.enabled=false",
        "logger=none",
        "trainer.num_threads=1",
        "trainer.enable_progress_bar=false",
        output_dir=tmp_path,
    )
    assert metrics["val/reward_accuracy_before"] == pytest.approx(0.5), metrics
    assert metrics["val/reward_accuracy"] >= 0.8, metrics
