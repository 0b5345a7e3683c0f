"""objective=reward: a Bradley-Terry reward model end to end, and loading it for scoring."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, run_one

# one thread: with the CPU shared, torch's spinning threads make runs ~30x slower
REWARD = ["objective=reward", "logger=none", "trainer.num_threads=1"]


def held_out_pairs(eval_size: int) -> list[dict]:
    from lmstack.config.groups.data import DataConfig
    from lmstack.data.sources import load_rows

    return load_rows(DataConfig(train_size=8, eval_size=eval_size), "reward").eval


def test_reward_run_reports_pairwise_accuracy_and_scores_pairs_after_loading(tmp_path):
    from lmstack.objectives.losses import reward_bt_loss
    from lmstack.objectives.reward import load_reward_model

    run_dir, metrics = run_one(*FAST, *REWARD, output_dir=tmp_path)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    for key in ("val/loss", "train/loss", "train/accuracy"):
        assert key in metrics, key
    marker = json.loads((run_dir / "reward_model.json").read_text())
    assert marker["objective"] == "reward" and marker["weights"] == "adapter"

    scorer = load_reward_model(run_dir)
    assert not scorer.training and not any(p.requires_grad for p in scorer.parameters())
    pairs = held_out_pairs(16)
    prompts = [row["prompt"] for row in pairs]
    chosen = scorer.score(prompts, [row["chosen"] for row in pairs])
    rejected = scorer.score(prompts, [row["rejected"] for row in pairs], batch_size=5)
    assert chosen.shape == rejected.shape == (16,)
    # the reloaded adapter and score head reproduce the run's own held-out loss
    loss = reward_bt_loss(chosen, rejected)["loss"]
    assert loss.item() == pytest.approx(metrics["val/loss"], abs=1e-4)
    alone = scorer.score(prompts[:1], [pairs[0]["chosen"]])
    assert torch.allclose(alone, chosen[:1], atol=1e-5), "batching must not change a score"


def test_a_directory_that_is_not_a_reward_run_is_rejected(tmp_path):
    from lmstack.errors import ConfigError
    from lmstack.objectives.reward import load_reward_model

    with pytest.raises(ConfigError, match=r"is not a reward-model run \(no reward_model\.json\)"):
        load_reward_model(tmp_path)


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(tmp_path):
    """Held-out pairwise accuracy >= 0.8 on the built-in task (fixed seeds).

    Measured with these seeds on the mixed-error pairs (arith.wrong_solution): 0.955 after
    900 steps at lr 1e-3 with tiny_base build 3 (margin 0.155; build 2 gave 0.905, and 0.795
    at 600 steps), about 2 minutes on 2 cores. On the earlier off-by-1..3-only pairs 600
    steps gave 0.935 (400: 0.835, lr 3e-3 diverged to 0.585).
    """
    _, metrics = run_one(
        *REWARD,
        "trainer.max_steps=900",
        "trainer.enable_progress_bar=false",
        "data.eval_size=200",
        "verify.enabled=false",
        output_dir=tmp_path,
    )
    assert metrics["val/accuracy"] >= 0.8, metrics
