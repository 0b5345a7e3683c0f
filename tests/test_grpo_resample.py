"""objective.dynamic_sampling=resample (DAPO's dynamic sampling): groups whose rewards all agree
are dropped and new prompts' groups are rolled out until the batch is full of groups with
differing rewards, at most objective.max_resample_rounds more batches."""

from __future__ import annotations

import torch

from conftest import REPO, assert_rejected_early, run_cli, run_one

# the scorers of tests/reward_scorers.py, importable by the run
SCORERS_ENV = {"PYTHONPATH": str(REPO / "tests")}
SMALL = (
    "objective=grpo",
    "objective.dynamic_sampling=resample",
    "objective.group_size=2",
    "objective.max_new_tokens=12",
    "data.train_size=32",
    "data.eval_size=4",
    "data.batch_size=4",
    "verify.enabled=false",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "trainer.num_threads=1",
)


def scorer(name: str) -> str:
    return f"objective.rewards=[{{name:scorer,scorer:'reward_scorers:{name}'}}]"


def test_zero_resample_rounds_is_refused(tmp_path):
    result = run_cli(
        "objective=grpo",
        "objective.dynamic_sampling=resample",
        "objective.max_resample_rounds=0",
        output_dir=tmp_path,
        check=False,
    )
    assert_rejected_early(result, "objective.max_resample_rounds", "must be >= 1")


def test_resample_fills_the_batch_with_groups_whose_rewards_differ(tmp_path):
    """Only prompts whose answer is a multiple of 3 get rewards that differ (about one in
    three): the first batch of 4 never has 4 such groups, so more are rolled out."""
    _, metrics = run_one(
        *SMALL,
        scorer("length_if_divisible_by_3"),
        "objective.max_resample_rounds=12",
        "objective.reward_check_steps=0",
        "trainer.max_steps=2",
        output_dir=tmp_path,
        env=SCORERS_ENV,
    )
    assert metrics["train/groups_resampled"] > 0, metrics
    assert metrics["train/resample_rounds"] >= 1
    assert metrics["train/groups_dropped"] > 0
    assert metrics["train/groups_trained"] == 4  # a full batch of prompts
    assert metrics["train/resample_bound_hit"] == 0


def test_resample_bound_trains_on_what_it_gathered(tmp_path):
    """A reward that never differs: one extra batch (the bound), then the update takes the
    batch whole (its KL term alone), as drop does, and says the bound was hit."""
    _, metrics = run_one(
        *SMALL,
        scorer("always_zero"),
        "objective.max_resample_rounds=1",
        "objective.reward_check_steps=0",
        "trainer.max_steps=1",
        output_dir=tmp_path,
        env=SCORERS_ENV,
    )
    assert metrics["train/resample_bound_hit"] == 1, metrics
    assert metrics["train/resample_rounds"] == 1
    assert metrics["train/groups_resampled"] == 4
    assert metrics["train/groups_dropped"] == 8  # the batch's 4 and the extra batch's 4
    assert metrics["train/groups_trained"] == 4


def test_joined_rollouts_keep_each_rows_log_probs(tiny_base):
    """Two batches' rollouts of different prompt and completion widths, joined (prompts
    left-padded, completions right-padded): every row's completion log-probs, and the groups
    kept by varied_groups, are what they were."""
    from transformers import AutoModelForCausalLM

    from lmstack.config.groups.model import ModelConfig
    from lmstack.data import arith
    from lmstack.data.prompts import collate_prompts, encode_prompts
    from lmstack.models.loading import load_tokenizer
    from lmstack.objectives.grpo import Rollout, join_rollouts, varied_groups
    from lmstack.objectives.rollout import (
        completion_logprobs,
        completion_mask,
        repeat_prompts,
        sample_completions,
    )

    tokenizer = load_tokenizer(str(tiny_base), ModelConfig())
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    problems = arith.problems(4, seed=0, held_out=True)
    rows = [arith.sft_row(p) for p in problems]
    rows[3]["prompt"] += " Think it through, step by step."  # a wider second batch
    torch.manual_seed(0)
    rollouts, alone = [], []
    for part, new_tokens in ((rows[:2], 6), (rows[2:], 10)):
        batch = collate_prompts(encode_prompts(part, tokenizer, 200, "test"), pad)
        completions = sample_completions(model, batch, 2, new_tokens, pad, eos)
        mask = completion_mask(completions, eos)
        prompt_ids, prompt_mask = repeat_prompts(batch, 2)
        with torch.no_grad():
            logps = completion_logprobs(model, prompt_ids, prompt_mask, completions, mask)
        alone.append(logps.sum(-1))
        rollouts.append(
            Rollout(
                prompt_ids=prompt_ids,
                prompt_mask=prompt_mask,
                completions=completions,
                mask=mask,
                texts=tokenizer.batch_decode(completions),
                rewards=torch.tensor([1.0, 0.0, 2.0, 2.0]),  # group 2 of each agrees
                parts={"scorer": torch.tensor([1.0, 0.0, 2.0, 2.0])},
                advantages=torch.tensor([0.7, -0.7, 0.0, 0.0]),
                ref_logps=logps,
            )
        )
    assert rollouts[0].prompt_ids.shape[1] < rollouts[1].prompt_ids.shape[1]
    assert rollouts[0].completions.shape[1] < rollouts[1].completions.shape[1]

    joined = join_rollouts(rollouts, pad)
    assert joined.prompt_ids.shape == (8, rollouts[1].prompt_ids.shape[1])
    assert joined.completions.shape == (8, rollouts[1].completions.shape[1])
    assert joined.texts == rollouts[0].texts + rollouts[1].texts
    with torch.no_grad():
        logps = completion_logprobs(
            model, joined.prompt_ids, joined.prompt_mask, joined.completions, joined.mask
        )
    assert torch.allclose(logps.sum(-1), torch.cat(alone), atol=1e-4)
    assert torch.allclose(joined.ref_logps.sum(-1), torch.cat(alone))

    varied = [varied_groups(r, 2) for r in rollouts]
    assert [v.groups_dropped for v in varied] == [1, 1]
    kept = join_rollouts(varied, pad)
    assert kept.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert kept.groups_dropped == 2
    assert torch.allclose(kept.ref_logps.sum(-1), torch.cat([a[:2] for a in alone]))
