"""TRL's conversational formats: a prompt, completion, chosen or rejected given as a list
of chat messages (with system prompts and earlier turns), for sft, dpo, reward, ppo and
grpo rows; data.truncation; and the exit-2 message for a prompt of another type."""

from __future__ import annotations

import json

import pytest

from lmstack.data.prompts import encode_prompts
from lmstack.data.sources import load_rows
from lmstack.data.tokenize import (
    IGNORE_INDEX,
    encode_preference,
    encode_prompt_completion,
    fit_length,
)
from lmstack.errors import DataError

from conftest import FAST, assert_rejected_early, data_config, run_cli, run_one

SYSTEM = {"role": "system", "content": "Answer with a number."}
HISTORY = [
    SYSTEM,
    {"role": "user", "content": "1 + 1?"},
    {"role": "assistant", "content": "2."},
    {"role": "user", "content": "2 + 2?"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_random):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_random)


def targets(example: dict, tokenizer) -> str:
    ids = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


def test_conversational_preference_pair_learns_only_its_answers(tokenizer):
    row = {
        "prompt": HISTORY,
        "chosen": [{"role": "assistant", "content": "4."}],
        "rejected": "5.",  # TRL allows either; both render as one assistant turn
    }
    pair = encode_preference(row, tokenizer, 256)
    # the history's assistant turn ("2.") is context, not a target
    assert targets(pair["chosen"], tokenizer) == "4.<|end|>"
    assert targets(pair["rejected"], tokenizer) == "5.<|end|>"
    text = tokenizer.decode(pair["chosen"]["input_ids"])
    assert text.startswith("<s><|system|>Answer with a number.<|end|><|user|>1 + 1?")
    as_string = encode_preference({**row, "chosen": "4."}, tokenizer, 256)
    assert as_string["chosen"] == pair["chosen"]


def test_prompt_and_completion_as_message_lists(tokenizer):
    completion = [{"role": "assistant", "content": "4."}]
    example = encode_prompt_completion(HISTORY, completion, tokenizer, 256)
    assert targets(example, tokenizer) == "4.<|end|>"
    plain = encode_prompt_completion("2 + 2?", "4.", tokenizer, 256)
    assert targets(plain, tokenizer) == "4.<|end|>"


def test_rl_prompts_as_message_lists_keep_the_system_prompt(tokenizer):
    rows = [{"prompt": HISTORY, "answer": 4}, {"prompt": "2 + 2?"}]
    conversational, plain = encode_prompts(rows, tokenizer, 256, "rows.jsonl")
    text = tokenizer.decode(conversational["input_ids"])
    assert text.startswith("<s><|system|>") and text.endswith("2 + 2?<|end|><|assistant|>")
    assert tokenizer.decode(plain["input_ids"]).endswith("<|user|>2 + 2?<|end|><|assistant|>")
    assert conversational["prompt"] == HISTORY  # reward functions receive the row's prompt


def test_truncation_cuts_or_drops_and_counts(tokenizer):
    long = {"prompt": "1 + 1? " * 40, "chosen": "2.", "rejected": "3."}
    short = {"prompt": "1 + 1?", "chosen": "2.", "rejected": "3."}

    def pairs():
        return [encode_preference(row, tokenizer, None) for row in (long, short)]

    cut, over = fit_length(pairs(), 32, "truncate")
    assert over == 1 and len(cut) == 2
    assert all(len(seq["input_ids"]) <= 32 for pair in cut for seq in pair.values())
    kept, over = fit_length(pairs(), 32, "drop")
    assert over == 1 and len(kept) == 1 and kept[0] == pairs()[1]


@pytest.mark.parametrize(
    "objective,row",
    [
        ("dpo", {"prompt": HISTORY, "chosen": "4.", "rejected": "5."}),
        ("reward", {"prompt": HISTORY, "chosen": "4.", "rejected": "5."}),
        ("grpo", {"prompt": HISTORY, "answer": 4}),
        ("ppo", {"prompt": HISTORY}),
        ("sft", {"prompt": HISTORY, "completion": [{"role": "assistant", "content": "4."}]}),
    ],
)
def test_conversational_rows_pass_the_row_check(tmp_path, objective, row):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    rows = load_rows(data_config(path=str(path)), objective)
    assert rows.train[0]["prompt"] == HISTORY


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ({"role": "user", "content": "2 + 2?"}, "'prompt' is dict"),
        (7, "'prompt' is int"),
        ([{"role": "user", "text": "2 + 2?"}], "'prompt' is list"),
    ],
)
def test_a_prompt_that_is_neither_string_nor_messages_is_named(tmp_path, bad, fragment):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1 + 1?", "chosen": "2", "rejected": "3"}, {"prompt": bad, "chosen": "4"}]
    path.write_text("".join(json.dumps(r | {"rejected": "5"}) + "\n" for r in rows))
    with pytest.raises(DataError) as error:
        load_rows(data_config(path=str(path)), "dpo")
    message = str(error.value)
    assert f"{path}:2" in message and fragment in message and "list of {role, content}" in message


def test_a_bad_preference_prompt_exits_2_naming_file_and_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1 + 1?", "chosen": "2", "rejected": "3"}, {"prompt": 7, "chosen": "4"}]
    path.write_text("".join(json.dumps(r | {"rejected": "5"}) + "\n" for r in rows))
    result = run_cli(
        "objective=reward", "data=jsonl", f"data.path={path}", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, f"{path}:2", "'prompt' is int", "chat messages, e.g.")


def conversational_pairs(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        prompt = [SYSTEM, {"role": "user", "content": f"{i} + 1?" + " and" * (30 * (i == 0))}]
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": f"{i + 1}."}],
                "rejected": [{"role": "assistant", "content": f"{i + 2}."}],
            }
        )
    return rows


def test_dpo_trains_on_conversational_rows_and_counts_dropped_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversational_pairs(24)))
    _, metrics = run_one(
        *FAST,
        "objective=dpo",
        "data=jsonl",
        f"data.path={path}",
        "data.eval_fraction=0.25",
        "data.max_length=40",
        "data.truncation=drop",
        "trainer.max_steps=2",
        "logger=none",
        "trainer.num_threads=1",
        output_dir=tmp_path / "out",
    )
    assert metrics["data/dropped_rows"] == 1  # row 0's prompt is over 40 tokens
    assert metrics["data/train_examples"] + metrics["data/eval_examples"] == 23
    assert 0.0 <= metrics["val/reward_accuracy"] <= 1.0
