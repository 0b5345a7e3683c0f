"""The tracker facade: logger=mlflow records a sweep as a parent run with its points nested
under it, each with the config and metrics, the parent with the summary table and plot; read
back through MLflow's own client, as `mlflow ui` would show them."""

from __future__ import annotations

import pytest

from lmstack.tracking.loggers import mlflow_store

from conftest import run_cli, run_dirs

TINY = [
    "trainer.max_steps=2",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.enable_progress_bar=false",
    "data.train_size=32",
    "data.eval_size=8",
    "data.batch_size=8",
    "verify.enabled=false",
    "trainer.num_threads=1",
]


def test_mlflow_sweep_is_a_parent_run_with_its_points_nested(tmp_path):
    """With points in parallel processes (joblib), which find no store yet and race to make it."""
    mlflow = pytest.importorskip("mlflow")
    launcher = "hydra/launcher=joblib"
    run_cli("-m", "adapter.r=2,4", "logger=mlflow", launcher, *TINY, output_dir=tmp_path)

    uri, _ = mlflow_store({"store_dir": str(tmp_path / "mlflow")})
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lmstack")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("lmstack.job_type") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert sorted(c.data.params["adapter/r"] for c in children) == ["2", "4"]
    assert {c.info.run_name for c in children} == {d.name for d in run_dirs(tmp_path)}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["objective/name"] == "sft"
        assert {"val/loss", "train/loss", "params/trainable"} <= set(child.data.metrics)
        config = mlflow.artifacts.load_dict(f"{child.info.artifact_uri}/config.json")
        assert config["adapter"]["r"] == int(child.data.params["adapter/r"])

    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"plots", "sweep_summary.json", "config.json"} <= parent_files
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/metric_vs_adapter.r.png" in plots
    assert any(key.startswith("best/") for key in parent.data.metrics)
    assert parent.data.tags["best/run_dir"] in {str(d) for d in run_dirs(tmp_path)}


def test_headline_metric_and_direction_come_from_the_phase_declarations():
    from lmstack.config.phases import PHASES
    from lmstack.tracking.headline import direction_of, sweep_metric_key

    for spec in PHASES.values():
        for name, direction in spec.headline:
            assert direction_of(name) == direction
            assert direction_of(f"dpo/{name}") == direction  # a pipeline stage's figure
    assert direction_of("bench/ttft_ms_p99") == "minimize"
    assert direction_of("bench/goodput") == "maximize"
    assert direction_of("bench/ttft_ms_p99", requested="maximize") == "maximize"
    metrics = {"val/loss": 0.5, "eval/score": 0.7, "train/loss": 0.4}
    assert sweep_metric_key(metrics, phase="train") == "val/loss"
    assert sweep_metric_key(metrics, phase="eval") == "eval/score"
    assert sweep_metric_key(metrics, phase="report") is None  # no headline declared
