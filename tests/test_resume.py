"""A killed run, re-run with the same command, resumes and ends where an uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import kill_at_first_checkpoint, run_cli, run_dirs

ARGS = [
    "trainer.max_steps=30",
    "trainer.checkpoint_every_n_steps=5",
    "trainer.enable_progress_bar=false",
    "trainer.num_threads=1",
    "data.train_size=80",
    "data.batch_size=8",  # 10 batches an epoch: the kill lands mid-epoch, the run spans 3
    "verify.enabled=false",
    "logger=csv",
]


def adapter_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    (run_dir,) = run_dirs(output_dir)
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_base):
    killed = tmp_path / "killed"
    kill_at_first_checkpoint(*ARGS, f"paths.output_dir={killed}", watch=killed)
    (run_dir,) = run_dirs(killed)
    assert not (run_dir / "metrics.json").exists()

    resumed = run_cli(*ARGS, output_dir=killed)
    assert "resuming from" in resumed.stdout
    run_cli(*ARGS, output_dir=tmp_path / "straight")

    got, want = adapter_weights(killed), adapter_weights(tmp_path / "straight")
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
