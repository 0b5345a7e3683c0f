"""Sweeps: sweep files compose, failed points are recorded and summarized, Optuna writes the
best parameters, interrupted points resume, and every multirun ends in a table and plots."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from lmstack.config.store import register_configs
from lmstack.launch import validate
from lmstack.tracking.headline import sweep_metric_key, wanted_metric
from lmstack.tracking.run_dir import write_json
from lmstack.tracking.summary import summarize
from lmstack.tracking.sweep_plots import pareto_front

from conftest import REPO, kill_at_first_checkpoint, run_cli, run_dirs

SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))
# one training step costs about a second here; verify off: the sweep metric is val/loss
TINY = [
    "trainer.max_steps=3",
    "trainer.checkpoint_every_n_steps=3",
    "trainer.enable_progress_bar=false",
    "data.train_size=48",
    "data.eval_size=16",
    "data.batch_size=8",
    "verify.enabled=false",
    "trainer.num_threads=1",
]


def sweep_dir_of(output_dir: Path) -> Path:
    (sweep_dir,) = (output_dir / "sweeps").iterdir()
    return sweep_dir


def summary_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


# ---- sweep files ---------------------------------------------------------------------------


def compose_sweep(*overrides: str, hydra: bool = False):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def first_value(spec: str) -> str:
    """A sweep parameter's first value: `a,b,c` (grid), choice(a, b) or interval(a, b) (Optuna)."""
    inner = re.sub(r"^(tag\(\w+,\s*)?(choice|interval|range)\(", "", spec.strip())
    return inner.split(",")[0].strip().rstrip(")")


def test_sweep_files_open_with_their_question_and_command():
    assert {"dpo_beta_adapter", "lora_rank_optuna", "serving_grid", "pipeline_grid"} <= set(SWEEPS)
    for name in SWEEPS:
        text = (REPO / "sweeps" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n# Question: "), name
        assert f"python run.py -m sweep={name}" in text, name


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_file_composes_with_its_points_and_stages(name):
    from lmstack.phases.pipeline import PLACEHOLDER, for_stage

    swept = compose_sweep(f"sweep={name}", hydra=True)
    params = dict(swept.hydra.sweeper.params)
    assert params, f"sweeps/{name}.yaml sweeps nothing"
    point = [f"{key}={first_value(str(spec))}" for key, spec in params.items()]
    config = validate(compose_sweep(f"sweep={name}", *point))
    assert config.sweep.direction in ("maximize", "minimize")
    if swept.hydra.runtime.choices["hydra/sweeper"] == "optuna":
        assert swept.hydra.sweeper.direction == config.sweep.direction
    for stage in config.phase.stages if config.phase.name == "pipeline" else []:
        overrides = [PLACEHOLDER.sub("/tmp/earlier-run", o) for o in stage.overrides]
        inherited = for_stage(["phase=train", f"sweep={name}", *point], overrides, "sft")
        stage_config = validate(compose_sweep(*inherited, *overrides))
        assert stage_config.phase.name in ("train", "eval")


def test_pipeline_objective_overrides_reach_only_stages_that_have_them():
    from lmstack.phases.pipeline import for_stage

    common = ["phase=train", "objective.beta=0.1", "objective.lr=1e-3", "adapter=qlora"]
    assert for_stage(common, ["objective=sft"], "dpo") == [
        "phase=train",
        "objective.lr=1e-3",
        "adapter=qlora",
    ]
    assert for_stage(common, ["objective=dpo", "model.init_from=/x"], "sft") == common


# ---- the sweep metric ------------------------------------------------------------------------


def test_sweep_metric_is_configurable_and_falls_back():
    metrics = {"val/loss": 1.5, "verify/score_after": 0.25, "bench/output_throughput": 40.0}
    assert sweep_metric_key(metrics) == "verify/score_after"
    assert sweep_metric_key(metrics, "val/loss") == "val/loss"
    assert sweep_metric_key(metrics, "eval/absent") is None
    assert wanted_metric("", "bench", "output_throughput") == "bench/output_throughput"
    assert wanted_metric("", "bench", "bench/ttft_ms_p50") == "bench/ttft_ms_p50"
    assert wanted_metric("val/loss", "bench", "output_throughput") == "val/loss"
    pipeline = {"sft/verify/score_after": 0.5, "dpo/verify/score_after": 0.75, "sft/val/loss": 1.0}
    assert sweep_metric_key(pipeline) == "dpo/verify/score_after"
    # nan (a bench with no completed request) is no value: Optuna records a failed trial
    assert (
        sweep_metric_key({"bench/output_throughput": float("nan")}, "bench/output_throughput")
        is None
    )


# ---- the summary on recorded points ------------------------------------------------------------


def test_pareto_front_keeps_points_nothing_beats():
    # (cost, quality): lower cost and higher quality are better
    points = [(10.0, 0.5), (20.0, 0.9), (15.0, 0.4), (30.0, 0.9), (5.0, 0.1)]
    assert pareto_front(points) == [4, 0, 1]


def record_point(sweep_dir: Path, name: str, overrides: list[str], status: str, metrics: dict):
    run_dir = sweep_dir / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"phase": {"name": "bench"}, "bench": {"metric": "output_throughput"}, "sweep": {}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    write_json(run_dir / "status.json", {"status": status})
    if metrics:
        write_json(run_dir / "metrics.json", metrics)


def test_serving_grid_summary_ranks_points_and_plots_throughput_against_latency(tmp_path):
    """The summary of a bench grid's records: best throughput first, a Pareto plot, the failed
    point listed as failed (the records are what phase=bench writes)."""
    sweep = tmp_path / "sweep-grid"
    for quant, conc, throughput, latency in [
        ("none", 1, 20.0, 100.0),
        ("none", 4, 60.0, 150.0),
        ("int8", 1, 10.0, 300.0),
        ("int8", 4, 30.0, 400.0),
    ]:
        metrics = {
            "bench/output_throughput": throughput,
            "bench/e2el_ms_p50": latency,
            "verify/score_after": 0.5,
        }
        overrides = [f"serving.quantization={quant}", f"bench.max_concurrency={conc}"]
        record_point(sweep, f"bench-hf-{quant}-{conc}", overrides, "finished", metrics)
    record_point(sweep, "bench-hf-nf4-1", ["serving.quantization=nf4", "bench.max_concurrency=1"],
                 "failed", {})  # fmt: skip

    summary = summarize(sweep)  # no logger: no W&B
    rows = summary_rows(sweep)
    assert [r["run_dir"].rsplit("/", 1)[-1] for r in rows][:2] == [
        "bench-hf-none-4",
        "bench-hf-int8-4",
    ]
    assert rows[-1]["status"] == "failed" and rows[-1]["serving.quantization"] == "nf4"
    assert summary.swept == ["serving.quantization", "bench.max_concurrency"]
    assert summary.metric_key == "bench/output_throughput" and summary.direction == "maximize"
    for png in (
        "metric_vs_serving.quantization.png",
        "metric_vs_bench.max_concurrency.png",
        "pareto_bench_output_throughput_vs_bench_e2el_ms_p50.png",
        "pareto_verify_score_after_vs_bench_e2el_ms_p50.png",
    ):
        assert (sweep / png).stat().st_size > 1000, png
    markdown = (sweep / "summary.md").read_text()
    assert "| serving.quantization | bench.max_concurrency | status |" in markdown
    assert "1 failed, 4 finished" in markdown


def test_summary_cli_names_a_missing_sweep_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lmstack.tracking.summary", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "no such sweep directory" in result.stderr and "Traceback" not in result.stderr


# ---- real sweeps -------------------------------------------------------------------------------


def wandb_run_of(folder: Path) -> tuple[str, str]:
    """(group, job_type) of the one W&B offline run under folder/wandb."""
    from test_train import wandb_records
    from wandb.proto import wandb_internal_pb2

    (run_file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    for payload in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "run":
            return record.run.run_group, record.run.job_type
    raise AssertionError(f"no run record in {run_file}")


def status_of(run_dir: Path) -> str:
    return json.loads((run_dir / "status.json").read_text())["status"]


def test_failed_point_does_not_stop_the_sweep_and_is_marked_failed(tmp_path):
    """adapter.r=0 is invalid: that point fails, the others finish; the summary (table, plot,
    W&B run in the sweep's group) lists it as failed; a re-run skips the finished points."""
    args = ["-m", "adapter.r=2,0,4", *TINY]
    result = run_cli(*args, output_dir=tmp_path)
    sweep = sweep_dir_of(tmp_path)
    statuses = {r["adapter.r"]: r["status"] for r in summary_rows(sweep)}
    assert statuses == {"2": "finished", "0": "failed", "4": "finished"}
    assert "adapter.r: rank must be positive" in result.stderr
    assert "| adapter.r | status |" in result.stdout  # the table ends the sweep's output
    assert (sweep / "metric_vs_adapter.r.png").stat().st_size > 1000
    failed = [d for d in run_dirs(tmp_path) if status_of(d) == "failed"]
    assert len(failed) == 1 and "adapter.r" in (failed[0] / "error.log").read_text()
    assert wandb_run_of(sweep) == (sweep.name, "summary")
    assert {wandb_run_of(d)[0] for d in run_dirs(tmp_path) if d not in failed} == {sweep.name}

    again = run_cli(*args, output_dir=tmp_path)
    assert again.stdout.count("already holds this finished run") == 2
    assert [r["status"] for r in summary_rows(sweep)].count("failed") == 1


def test_optuna_sweep_of_six_trials_writes_the_best_parameters(tmp_path):
    """The LoRA rank search with 6 trials; adapter.r=0 (invalid) fails its trial, the study goes
    on, and optimization_results.yaml in the sweep dir holds the best finished point."""
    run_cli(
        "-m",
        "sweep=lora_rank_optuna",
        "hydra.sweeper.n_trials=6",
        "adapter.r=choice(0, 2, 4)",
        "sweep.metric=val/loss",
        "sweep.direction=minimize",
        "hydra.sweeper.direction=minimize",
        *TINY,
        "logger=csv",
        output_dir=tmp_path,
    )
    sweep = sweep_dir_of(tmp_path)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"adapter.r", "adapter.alpha", "objective.lr"}
    rows = summary_rows(sweep)
    finished = [r for r in rows if r["status"] == "finished"]
    assert any(r["status"] == "failed" and r["adapter.r"] == "0" for r in rows)
    assert len(finished) >= 2 and len(rows) <= 6
    assert best["best_value"] == pytest.approx(min(float(r["val/loss"]) for r in finished))
    assert str(best["best_params"]["adapter.r"]) == finished[0]["adapter.r"]  # best first
    assert "optimization_results.yaml" in (sweep / "summary.md").read_text()


def test_optuna_sweep_whose_every_trial_fails_still_ends_in_its_summary(tmp_path):
    """Optuna's sweeper raises when no trial finished; the points that ran are summarized."""
    missing = tmp_path / "no-such-rows.jsonl"
    result = run_cli(
        "-m", "sweep=lora_rank_optuna", "hydra.sweeper.n_trials=2", "data=jsonl",
        f"data.path={missing}", "logger=none", output_dir=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "the sweep stopped early (see above); the 2 points that ran" in result.stderr
    rows = summary_rows(sweep_dir_of(tmp_path))
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert "2 points: 2 failed" in result.stdout
    assert f"data.path: no such file: {missing}" in result.stdout  # each failure's reason


@pytest.mark.slow  # keeps the default suite under its 15-minute budget
def test_interrupted_sweep_point_resumes_when_the_sweep_is_run_again(tmp_path):
    args = [
        "-m",
        "objective.lr=1e-3,2e-3",
        *TINY,
        "trainer.max_steps=9",
        "logger=none",
        f"paths.output_dir={tmp_path}",
    ]
    kill_at_first_checkpoint(*args, watch=tmp_path)
    (killed,) = run_dirs(tmp_path)
    assert status_of(killed) == "running"

    resumed = run_cli(*args[:-1], output_dir=tmp_path)
    assert "resuming from" in resumed.stdout
    assert [r["status"] for r in summary_rows(sweep_dir_of(tmp_path))] == ["finished"] * 2
