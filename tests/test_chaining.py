"""model.init_from: any objective starts from an earlier run's model, tokenizer and template."""

from __future__ import annotations

import json

import pytest

from conftest import CACHE_DIR, FAST, run_cli, run_dirs


@pytest.mark.e2e
def test_dpo_starts_from_the_sft_run(tmp_path):
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    run_cli(*FAST, "logger=none", "trainer.num_threads=1", output_dir=sft_out)
    (sft_dir,) = run_dirs(sft_out)
    # the merge is cached by run id: a checkout whose cache already holds it merges nothing
    cached = any(CACHE_DIR.glob(f"merged_runs/{sft_dir.name}-*/merged"))
    result = run_cli(
        *FAST,
        "objective=dpo",
        f"model.init_from={sft_dir}",
        "logger=none",
        "trainer.num_threads=1",
        output_dir=dpo_out,
    )
    assert cached or "merging the adapter" in result.stdout
    # merged into the cache, not into the SFT run's folder (nobody asked for it there)
    assert not (sft_dir / "merged").exists()
    (merged,) = CACHE_DIR.glob(f"merged_runs/{sft_dir.name}-*/merged")
    assert (merged / "tokenizer_config.json").exists()
    (dpo_dir,) = run_dirs(dpo_out)
    sft = json.loads((sft_dir / "metrics.json").read_text())
    dpo = json.loads((dpo_dir / "metrics.json").read_text())
    # before training, the DPO policy is exactly the SFT run's model
    assert dpo["verify/examples_before"] == sft["verify/examples_after"]
    assert dpo["verify/score_before"] == sft["verify/score_after"]


def test_init_from_a_folder_that_is_not_a_run(tmp_path):
    result = run_cli(f"model.init_from={tmp_path}", "logger=none", output_dir=tmp_path, check=False)
    assert result.returncode == 2
    assert "is neither an lmstack run directory" in result.stderr
    assert "adapter_config.json" in result.stderr
