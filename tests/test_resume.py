"""A killed run, re-run with the same command, resumes and ends where an uninterrupted run does."""

from __future__ import annotations

import pytest

from conftest import assert_resumes_to_the_straight_result

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


@pytest.mark.e2e
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_base):
    assert_resumes_to_the_straight_result(ARGS, tmp_path)
