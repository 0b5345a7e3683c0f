"""phase=pipeline and recipes: stages chain run directories; recipe files from anywhere."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from lmstack.errors import LmstackError
from lmstack.launch import stop_signals
from lmstack.phases.pipeline import run_stage_command

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


def mlflow_runs(store: Path) -> list:
    import mlflow

    from lmstack.tracking.loggers import mlflow_store

    client = mlflow.MlflowClient(mlflow_store({"store_dir": str(store)})[0])
    return client.search_runs([client.get_experiment_by_name("lmstack").experiment_id])


def write_recipe(folder: Path, body: str = RECIPE) -> Path:
    path = folder / "team_recipe.yaml"
    path.write_text(body.format(path=path))
    return path


@pytest.mark.e2e
def test_recipe_file_runs_a_pipeline_and_a_rerun_skips_its_stages(tmp_path):
    recipe = write_recipe(tmp_path)
    args = [f"recipe={recipe}", *FAST, "logger=mlflow", "trainer.num_threads=1"]
    result = run_cli(*args, output_dir=tmp_path / "out")
    assert "pipeline stage 2/2: dpo" in result.stdout
    (pipeline_dir,) = (tmp_path / "out" / "runs").glob("pipeline-*")
    metrics = json.loads((pipeline_dir / "metrics.json").read_text())
    sft_dir, dpo_dir = Path(metrics["sft/run_dir"]), Path(metrics["dpo/run_dir"])
    assert sft_dir.name.startswith("sft-lora-") and dpo_dir.name.startswith("dpo-lora-")
    # the dpo stage started from the sft stage's model
    assert metrics["dpo/verify/score_before"] == metrics["sft/verify/score_after"]
    # the stages and the pipeline are one group in the tracker (MLflow's tag; W&B's group)
    runs = mlflow_runs(tmp_path / "out" / "mlflow")
    assert {r.info.run_name for r in runs} == {pipeline_dir.name, sft_dir.name, dpo_dir.name}
    assert {r.data.tags["lmstack.group"] for r in runs} == {pipeline_dir.name}

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


# A stage that ends without recording its end, as one killed (the OOM killer, a native crash
# on the stop signal) does: at once, or when the pipeline stops it.
DYING_STAGE = """
import json, os, pathlib, signal, sys
run_dir, when = pathlib.Path(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGKILL))
pathlib.Path(os.environ["LMSTACK_RUN_DIR_REPORT"]).write_text(str(run_dir))
run_dir.mkdir()
(run_dir / "status.json").write_text(json.dumps({"run_id": "stage", "status": "running"}))
if when == "at-once":
    os.kill(os.getpid(), signal.SIGKILL)
signal.pause()
"""


def dying_stage(run_dir: Path, when: str) -> list[str]:
    return [sys.executable, "-c", DYING_STAGE, str(run_dir), when]


def stage_record(run_dir: Path) -> tuple[dict, str]:
    return json.loads((run_dir / "status.json").read_text()), (run_dir / "error.log").read_text()


def test_a_stage_killed_before_recording_its_end_is_recorded_failed_by_the_pipeline(tmp_path):
    stage_dir = tmp_path / "stage"
    with pytest.raises(LmstackError, match=r"stage 'sft' failed \(killed by SIGKILL\); see "):
        run_stage_command("sft", dying_stage(stage_dir, "at-once"))
    status, error_log = stage_record(stage_dir)
    ended = "the stage's process ended (killed by SIGKILL) before recording its end"
    assert status["status"] == "failed" and status["error"] == ended
    assert error_log == ended + "\n"


def test_a_stopped_stage_that_dies_on_the_signal_is_recorded_interrupted(tmp_path):
    """The pipeline's SIGTERM reaches the stage, which dies of it without a word; the
    pipeline records the stage as interrupted, so a re-run resumes it."""
    stage_dir = tmp_path / "stage"

    def stop_the_pipeline_once_the_stage_runs() -> None:
        deadline = time.monotonic() + 60
        while not (stage_dir / "status.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_the_pipeline_once_the_stage_runs, daemon=True).start()
    with stop_signals() as stops, pytest.raises(KeyboardInterrupt):
        run_stage_command("sft", dying_stage(stage_dir, "when-stopped"))
    assert stops.received == [signal.SIGTERM]
    status, error_log = stage_record(stage_dir)
    assert status["status"] == "interrupted", status
    assert status["error"] == "stopped by SIGTERM from its pipeline; re-run the command to resume"
    assert "ended (killed by SIGKILL) before recording its end" in error_log
