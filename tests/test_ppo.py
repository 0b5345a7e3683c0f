"""objective=ppo: bad input, the policy/value forward, a run end to end against a reward run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import FAST, assert_rejected, assert_rejected_early, run_cli, run_dirs, run_one

# one thread: with the CPU shared, torch's spinning threads make runs ~30x slower
QUIET = ["logger=none", "trainer.num_threads=1"]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("reward")
    run_cli(*FAST, "objective=reward", *QUIET, output_dir=output)
    (run_dir,) = run_dirs(output)
    return run_dir


def test_missing_reward_model_is_rejected_before_any_model_loads(tmp_path):
    result = run_cli("objective=ppo", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "objective.reward_model: ppo needs a reward-model run")


def test_a_run_that_is_not_a_reward_model_is_named(tmp_path):
    args = ("objective=ppo", f"objective.reward_model={tmp_path}", *FAST, *QUIET)
    result = run_cli(*args, output_dir=tmp_path / "out", check=False)
    assert_rejected(result, f"objective.reward_model: '{tmp_path}' is not a reward-model run")


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_policy_outputs_match_the_rollout_log_probs(tiny_base, reward_run, temperature):
    """Log-probs (policy and reference) are those of the sampling policy, at its temperature."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmstack.data.prompts import collate_prompts
    from lmstack.data.tokenize import render_chat
    from lmstack.objectives.ppo import PPOModule
    from lmstack.objectives.reward import load_reward_model
    from lmstack.objectives.rollout import completion_logprobs

    objective = SimpleNamespace(max_new_tokens=6, temperature=temperature, top_p=1.0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    module = PPOModule(model, tokenizer, load_reward_model(reward_run), objective, 1)
    questions = ("Ana has 2 pens and gets 3 more. How many pens?", "1 + 1?")
    examples = [
        {"input_ids": render_chat(tokenizer, [{"role": "user", "content": q}], True), "prompt": q}
        for q in questions
    ]
    batch = collate_prompts(
        [example | {"answer": None} for example in examples], tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    rollout = module.rollout(batch)
    with torch.no_grad():
        logps, values = module.policy_outputs(rollout)
        expected = completion_logprobs(
            model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completions,
            rollout.mask,
            temperature,
        )
    assert torch.allclose(logps, expected, atol=1e-5)
    # full fine-tuning: the reference is a frozen copy, equal to the policy before training
    assert torch.allclose(rollout.ref_logps, expected, atol=1e-5)
    assert values.shape == logps.shape and torch.all(values == 0)  # zero-initialised head
    assert rollout.scores.shape == (2,)


def test_ppo_end_to_end_logs_reward_score_and_kl(tmp_path, reward_run):
    args = ("objective=ppo", f"objective.reward_model={reward_run}", *FAST, *QUIET)
    run_dir, metrics = run_one(*args, output_dir=tmp_path)
    for key in (
        "train/reward_score",
        "train/kl",
        "train/policy_loss",
        "train/value_loss",
        "train/clip_fraction",
        "val/reward_score",
    ):
        assert key in metrics, key
    assert metrics["train/kl"] > -1.0  # a sampled estimate; near 0 after a few steps
    assert (run_dir / "adapter" / "value_head.safetensors").is_file()
    # sampled completions with their prompt, reference and reward-model score, from step 0
    samples = [json.loads(line) for line in (run_dir / "samples" / "ppo.jsonl").open()]
    assert samples[0]["step"] == 0 and samples[0]["prompt"] and "reward" in samples[0]
    assert samples[0]["reference"] is not None  # the built-in rows carry their answer


@pytest.mark.slow
def test_ppo_raises_the_held_out_reward_model_score(tmp_path):
    """From a brief SFT start (20 steps, via model.init_from), 120 PPO updates lift the mean
    reward-model score of greedy held-out completions by >= 1.0 over the same policy before
    PPO, with KL logged.

    Measured with these seeds: -0.17 -> 1.29 (+1.46) after 120 updates, train/kl 1.8 (60
    updates gave +1.17); about 2 minutes on 2 cores for the three runs.
    """
    steps = ("trainer.enable_progress_bar=false", "verify.enabled=false", *QUIET)
    sft_steps = ("trainer.max_steps=20", "trainer.checkpoint_every_n_steps=10")
    run_cli("objective=sft", *sft_steps, *steps, output_dir=tmp_path / "sft")
    run_cli("objective=reward", "trainer.max_steps=400", *steps, output_dir=tmp_path / "rm")
    (sft,), (reward,) = run_dirs(tmp_path / "sft"), run_dirs(tmp_path / "rm")
    _, metrics = run_one(
        "objective=ppo",
        f"objective.reward_model={reward}",
        f"model.init_from={sft}",
        "trainer.max_steps=120",
        "data.eval_size=64",
        *steps,
        output_dir=tmp_path / "ppo",
    )
    assert "train/kl" in metrics
    assert metrics["val/reward_score"] >= metrics["val/reward_score_before"] + 1.0, metrics
