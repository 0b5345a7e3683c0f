"""Many processes through Lightning's DDP on this CPU (gloo): the same training as one process.

Two processes with the global batch split between them must follow one process's loss curve
and end with its adapter (float tolerance): the batch sampler gives each rank its share of
every global batch, and the SFT loss is the mean over the global batch's target tokens.

FSDP is not tested here: Lightning 2.6 runs FSDPStrategy only with a CUDA accelerator (its
accelerator connector refuses `strategy="fsdp"` with `accelerator="cpu"`), so it is in the
gpu-marked tests (tests/test_gpu.py, scripts/gpu_check.sh). A run asking for it on this
machine gets exit 2 (test_scale_out_a_machine_cannot_run_exits_2).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    adapter_weights,
    assert_rejected_early,
    assert_resumes_to_the_straight_result,
    run_cli,
    run_dirs,
    start_cli,
)

DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
ONE = ["trainer.accelerator=cpu"]
SHORT = [
    "trainer.max_steps=4",
    "trainer.checkpoint_every_n_steps=4",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "data.train_size=64",
    "data.eval_size=8",
    "data.batch_size=8",
    "verify.enabled=false",
    "logger=csv",
]


def loss_curve(output_dir: Path) -> list[float]:
    (run_dir,) = run_dirs(output_dir)
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row["train/loss"]]


def assert_same_training(got: Path, want: Path, steps: int) -> None:
    # one row a step (log_every_n_steps=1); the run's final record may add one more
    got_curve, want_curve = loss_curve(got)[:steps], loss_curve(want)[:steps]
    assert len(want_curve) == steps, want_curve
    torch.testing.assert_close(
        torch.tensor(got_curve), torch.tensor(want_curve), rtol=1e-5, atol=1e-5
    )
    got_weights, want_weights = adapter_weights(got), adapter_weights(want)
    assert got_weights.keys() == want_weights.keys() and want_weights
    for name, value in want_weights.items():
        torch.testing.assert_close(got_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)
    # the adapter moved: the comparison is not between two untrained adapters
    assert any(value.abs().max() > 1e-6 for name, value in want_weights.items() if "lora_B" in name)


@pytest.mark.e2e
def test_ddp_sft_matches_one_process(tmp_path, tiny_base):
    two = run_cli(*DDP, *SHORT, output_dir=tmp_path / "ddp")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in two.stdout + two.stderr
    run_cli(*ONE, *SHORT, output_dir=tmp_path / "one")
    assert_same_training(tmp_path / "ddp", tmp_path / "one", steps=4)
    # one set of records, written by rank zero; rank 1 left only its log
    (run_dir,) = run_dirs(tmp_path / "ddp")
    assert (run_dir / "metrics.json").exists() and (run_dir / "rank1.log").exists()
    assert not (run_dir / ".hydra" / "rank1.yaml").exists()


@pytest.mark.slow
def test_ddp_dpo_with_cached_reference_matches_one_process(tmp_path, tiny_base):
    dpo = ["objective=dpo", "objective.precompute_ref=true", f"paths.ref_logps_dir={tmp_path}/ref"]
    two = run_cli(*DDP, *SHORT, *dpo, output_dir=tmp_path / "ddp")
    # computed once by rank zero before it started rank 1, which read it from the cache
    assert (two.stdout + two.stderr).count("reference log-probs from the cache") == 1
    run_cli(*ONE, *SHORT, *dpo, output_dir=tmp_path / "one")
    assert_same_training(tmp_path / "ddp", tmp_path / "one", steps=4)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["reward", "grpo", "ppo"])
def test_other_objectives_train_under_ddp(objective, tmp_path, tiny_base):
    """Reward pairs and GRPO/PPO prompts split by rank (a GRPO group stays on its rank); one
    set of records."""
    args = [*SHORT, f"objective={objective}", "trainer.max_steps=2", "data.batch_size=4"]
    if objective == "ppo":  # PPO scores with a reward-model run, trained first in one process
        run_cli(*SHORT, "objective=reward", "trainer.max_steps=2", output_dir=tmp_path / "rw")
        (reward_run,) = run_dirs(tmp_path / "rw")
        args.append(f"objective.reward_model={reward_run}")
    result = run_cli(*DDP, *args, output_dir=tmp_path / "run")
    tmp_path = tmp_path / "run"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    (run_dir,) = run_dirs(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    loss = metrics["train/policy_loss" if objective == "ppo" else "train/loss"]
    assert loss == loss  # a number, not nan
    assert (run_dir / "adapter").exists() and '"finished"' in (run_dir / "status.json").read_text()


RESUME = [
    *DDP,
    "trainer.max_steps=16",
    "trainer.checkpoint_every_n_steps=4",
    "trainer.enable_progress_bar=false",
    "data.train_size=48",
    "data.batch_size=8",  # 6 global batches an epoch: the kill lands mid-epoch
    "data.eval_size=8",
    "verify.enabled=false",
    "logger=csv",
]


@pytest.mark.slow
def test_killed_ddp_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_base):
    assert_resumes_to_the_straight_result(RESUME, tmp_path)


@pytest.mark.slow
def test_a_failed_rank_ends_the_run_with_one_message(tmp_path, tiny_base):
    """Rank 1 killed mid-training: rank zero stops, says so, records it; no process is left."""
    import psutil

    args = [*RESUME, "trainer.max_steps=400", f"paths.output_dir={tmp_path}"]
    process = start_cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and not list(tmp_path.rglob("checkpoints/last.ckpt")):
        time.sleep(0.1)
    children = psutil.Process(process.pid).children(recursive=True)
    ranks = [c for c in children if "hydra.job.name=rank1" in " ".join(c.cmdline())]
    assert ranks, [c.cmdline() for c in children]
    os.kill(ranks[0].pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]
    assert "training process rank 1 exited with code -9" in stderr
    (run_dir,) = run_dirs(tmp_path)
    assert '"failed"' in (run_dir / "status.json").read_text()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_scale_out_bad_input_exits_2_before_loading(tmp_path):
    cases = [
        (
            ["trainer.strategy=fsdp", "adapter=qlora", "quantization=nf4"],
            ["trainer.strategy=fsdp", "quantization=nf4", "trainer.strategy=ddp"],
        ),
        (["trainer.devices=2", "data.batch_size=7"], ["data.batch_size", "multiple of 2"]),
        (
            ["trainer.strategy=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"],
            ["trainer.strategy=fsdp", "trainer.accelerator=cpu", "trainer.strategy=ddp"],
        ),
        (
            ["trainer.strategy=deepspeed_stage_2"],
            ["trainer.strategy=deepspeed_stage_2", "trainer.strategy=ddp"],
        ),
        (
            ["trainer.devices=64", "trainer.accelerator=cpu", "data.batch_size=64"],
            ["trainer.devices=64", f"{os.cpu_count()} CPU cores", "trainer.accelerator=cpu"],
        ),
    ]
    for overrides, fragments in cases:
        result = run_cli(*overrides, output_dir=tmp_path, check=False, timeout=60)
        assert_rejected_early(result, *fragments)
