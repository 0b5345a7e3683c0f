"""phase=pipeline and recipes: stages chain run directories; recipe files from anywhere."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import FAST, run_cli

RECIPE = """\
# @package _global_
# A two-stage test pipeline: SFT, then DPO from it.
#   python run.py recipe={path}
defaults:
  - override /phase: pipeline
phase:
  stages:
    - name: sft
      overrides: [objective=sft]
    - name: dpo
      overrides: [objective=dpo, "model.init_from={{sft}}"]
"""


def write_recipe(folder: Path, body: str = RECIPE) -> Path:
    path = folder / "team_recipe.yaml"
    path.write_text(body.format(path=path))
    return path


def test_recipe_file_runs_a_pipeline_and_a_rerun_skips_its_stages(tmp_path):
    recipe = write_recipe(tmp_path)
    args = [f"recipe={recipe}", *FAST, "logger=none", "trainer.num_threads=1"]
    result = run_cli(*args, output_dir=tmp_path / "out")
    assert "pipeline stage 2/2: dpo" in result.stdout
    (pipeline_dir,) = (tmp_path / "out" / "runs").glob("pipeline-*")
    metrics = json.loads((pipeline_dir / "metrics.json").read_text())
    sft_dir, dpo_dir = Path(metrics["sft/run_dir"]), Path(metrics["dpo/run_dir"])
    assert sft_dir.name.startswith("sft-lora-") and dpo_dir.name.startswith("dpo-lora-")
    # the dpo stage started from the sft stage's model
    assert metrics["dpo/verify/score_before"] == metrics["sft/verify/score_after"]

    again = run_cli(*args, output_dir=tmp_path / "out")
    assert again.stdout.count("already holds this finished run") >= 2


def test_stage_naming_an_unknown_stage_fails_clearly(tmp_path):
    recipe = write_recipe(tmp_path, RECIPE.replace("{{sft}}", "{{nope}}"))
    result = run_cli(
        f"recipe={recipe}", *FAST, "logger=none", output_dir=tmp_path / "out", check=False
    )
    assert result.returncode == 2
    assert "refers to {nope}, which is not an earlier stage" in result.stderr


def test_missing_recipe_file(tmp_path):
    result = run_cli(f"recipe={tmp_path}/absent.yaml", output_dir=tmp_path, check=False)
    assert result.returncode == 2 and "no such file" in result.stderr
