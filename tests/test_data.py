"""Data formats, chat-template masking and padding-free packing, on the built-in tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.data import arith
from lmstack.data.loading import ResumableBatchSampler, collate_packed, collate_padded
from lmstack.data.sources import load_rows
from lmstack.data.tokenize import IGNORE_INDEX, encode_messages, encode_prompt_completion
from lmstack.errors import DataError
from lmstack.objectives.losses import causal_lm_loss

from conftest import data_config


@pytest.fixture(scope="module")
def tokenizer(tiny_random):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_random)


@pytest.fixture(scope="module")
def model(tiny_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()


def test_verifier_checks_the_stated_answer():
    problem = arith.Problem(7, 5, "-", "Ana", "pens")
    assert problem.answer == 2
    assert arith.verify(problem.solution(), problem.answer) == 1.0
    assert arith.verify(problem.solution(3), problem.answer) == 0.0
    assert arith.verify("no number here", problem.answer) == 0.0


def test_train_and_held_out_problems_never_share_a_triple():
    train = {(p.a, p.op, p.b) for p in arith.problems(500, 0, held_out=False)}
    held = {(p.a, p.op, p.b) for p in arith.problems(100, 0, held_out=True)}
    assert train and held and not train & held


def test_completion_only_labels(tokenizer):
    example = encode_prompt_completion("What is 2 + 2?", "The answer is 4.", tokenizer, 128)
    targets = [
        t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(targets) == "The answer is 4.<|end|>"
    assert example["labels"][0] == IGNORE_INDEX


def test_multi_turn_messages_learn_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4."},
    ]
    example = encode_messages(messages, tokenizer, 256)
    targets = [
        t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(targets) == "2.<|end|>4.<|end|>"


def test_jsonl_formats_are_detected(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": str(i)},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows(data_config(path=str(path)), "sft")
    assert loaded.format == "messages"
    assert len(loaded.train) == 6 and len(loaded.eval) == 2


def test_parquet_rows_are_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["c", None]}), path)
    with pytest.raises(DataError, match=r"train.parquet:2: row is missing completion"):
        load_rows(data_config(source="parquet", path=str(path)), "sft")


def test_messages_without_assistant_turn_rejected(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant turn"):
        load_rows(data_config(path=str(path)), "sft")


def test_packed_and_padded_batches_give_the_same_loss(tokenizer, model):
    problems = arith.problems(6, seed=3, held_out=False)
    examples = [
        encode_prompt_completion(p.question, p.solution(), tokenizer, 128) for p in problems
    ]
    packed = collate_packed(examples)
    padded = collate_padded(examples, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] == 1
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # no pad tokens
    with torch.no_grad():
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        padded_logits = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
        ).logits
    packed_loss = causal_lm_loss(packed_logits, packed["labels"])
    padded_loss = causal_lm_loss(padded_logits, padded["labels"])
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-5)


def test_packing_without_position_ids_would_leak_across_sequences(tokenizer, model):
    """The block-causal mask matters: dropping position_ids changes the loss."""
    problems = arith.problems(4, seed=5, held_out=False)
    examples = [
        encode_prompt_completion(p.question, p.solution(), tokenizer, 128) for p in problems
    ]
    packed = collate_packed(examples)
    with torch.no_grad():
        isolated = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        leaking = model(input_ids=packed["input_ids"], use_cache=False).logits
    assert not torch.allclose(
        causal_lm_loss(isolated, packed["labels"]),
        causal_lm_loss(leaking, packed["labels"]),
        atol=1e-3,
    )


def test_batch_sampler_resumes_where_it_stopped():
    full = ResumableBatchSampler(40, 4, seed=1)
    uninterrupted = [b for _ in range(2) for b in full]  # two epochs
    first = ResumableBatchSampler(40, 4, seed=1)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == 7:
            break
    resumed = ResumableBatchSampler(40, 4, seed=1)
    resumed.load_state_dict(first.state_dict())
    rest = [b for b in resumed] + [b for b in resumed]
    assert seen + rest[: len(uninterrupted) - 7] == uninterrupted
    assert uninterrupted[:10] != uninterrupted[10:]  # reshuffled per epoch
