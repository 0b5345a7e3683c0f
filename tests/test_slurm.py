"""Sweeps through the Slurm launcher on a real cluster, requeue and resume, launcher configs.

The cluster tests need a running Slurm cluster (`.ci/slurm_cluster.sh start`, which `.ci/run`
calls); where none answers they skip and say so.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from lmstack.config.store import register_configs

from conftest import FAST, REPO, run_cli, run_dirs

SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "trainer.num_threads=1",
    "logger=csv",
    "verify.enabled=false",
]
# tests on the running cluster: `make test-integration` (and CI) runs them, `make test` does not
NEEDS_CLUSTER = pytest.mark.slurm
SLOW = pytest.mark.slow  # another 90 s; the default suite runs the requeue signal's case
# long enough to signal mid-training: 20 batches an epoch, 60 steps, a checkpoint every 10
RESUME_ARGS = [
    "trainer.num_threads=1",
    "trainer.max_steps=60",
    "trainer.checkpoint_every_n_steps=10",
    "trainer.enable_progress_bar=false",
    "data.train_size=160",
    "data.eval_size=16",
    "data.batch_size=8",
    "verify.enabled=false",
    "logger=csv",
]


def cluster_problem() -> str | None:
    """Why no Slurm cluster is usable here, or None."""
    start = "start one with .ci/slurm_cluster.sh start"
    if shutil.which("sinfo") is None:
        return f"no Slurm here (sinfo not found); {start}"
    try:
        answer = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return f"slurmctld does not answer (sinfo timed out); {start}"
    if answer.returncode != 0:
        return f"slurmctld does not answer ({answer.stderr.strip()}); {start}"
    states = {state.rstrip("*~#!%$@^-") for state in answer.stdout.split()}
    if not states & {"idle", "mixed", "allocated", "completing"}:
        return f"no Slurm node is up (node states: {sorted(states) or 'none'}); {start}"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Skips without a cluster; fails instead where one is required (`.ci/run` starts one)."""
    if problem := cluster_problem():
        if os.environ.get("LMSTACK_REQUIRE_SLURM") == "1":
            pytest.fail(f"LMSTACK_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def compose_with_hydra(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_launcher_configs_compose_over_the_plugins_defaults():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    slurm = compose_with_hydra("hydra/launcher=slurm").hydra.launcher
    # lmstack's subclass of the plugin's launcher, which Hydra finds among its plugins
    assert slurm._target_ == "hydra_plugins.lmstack_launchers.slurm_launcher.SlurmLauncher"
    launchers = Plugins.instance().discover(Launcher)
    assert slurm._target_ in {f"{cls.__module__}.{cls.__name__}" for cls in launchers}
    assert (slurm.partition, slurm.cpus_per_task, slurm.max_num_timeout) == ("debug", 2, 3)
    # the plugin's keys we did not set are still there
    assert "additional_parameters" in slurm and "qos" in slurm
    overridden = compose_with_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert overridden.hydra.launcher.partition == "gpu"

    joblib = compose_with_hydra("hydra/launcher=joblib").hydra.launcher
    assert joblib._target_.endswith("joblib_launcher.JoblibLauncher")
    assert (joblib.n_jobs, joblib.backend, joblib.prefer) == (2, "loky", "processes")


def test_launcher_configs_open_with_a_comment_and_the_command():
    for name in ("slurm", "joblib"):
        text = (REPO / "conf" / "hydra" / "launcher" / f"{name}.yaml").read_text()
        assert text.startswith("#") and f"hydra/launcher={name}" in text, name


def job_logs(sweep: Path) -> dict[str, str]:
    """Each Slurm job's stdout in the sweep's submitit folder, by job id."""
    return {log.parent.name: log.read_text() for log in sweep.glob("slurm/*/*_log.out")}


def summary_statuses(sweep: Path) -> list[str]:
    """The status column of the sweep's summary table (written when the multirun ends)."""
    with open(sweep / "summary.csv") as handle:
        return [row["status"] for row in csv.DictReader(handle)]


def read_status(run_dir: Path) -> str:
    return json.loads((run_dir / "status.json").read_text())["status"]


@NEEDS_CLUSTER
def test_a_slurm_sweep_finishes_every_point_and_a_rerun_skips_them(
    tmp_path, tiny_base, slurm_cluster
):
    command = ["-m", *SLURM, *FAST, "seed=1,2", "objective.lr=1e-3,3e-3"]
    run_cli(*command, output_dir=tmp_path)
    (sweep,) = (tmp_path / "sweeps").iterdir()
    points = run_dirs(sweep)
    assert len(points) == 4 and {read_status(p) for p in points} == {"finished"}
    first_jobs = job_logs(sweep)
    assert len(first_jobs) == 4, f"one Slurm job a point: {sorted(first_jobs)}"
    assert all("trainable of" in log for log in first_jobs.values())
    for point in points:  # each point names the job whose log (in the sweep dir) shows its result
        job = json.loads((point / "status.json").read_text())["slurm_job"]
        val_loss = json.loads((point / "metrics.json").read_text())["val/loss"]
        assert f"{val_loss:.4f}" in first_jobs[job], (job, first_jobs[job])
    assert summary_statuses(sweep) == ["finished"] * 4
    trained = {p: (p / "metrics.json").stat().st_mtime_ns for p in points}

    run_cli(*command, output_dir=tmp_path)
    second_jobs = {job: log for job, log in job_logs(sweep).items() if job not in first_jobs}
    assert len(second_jobs) == 4, f"the re-run's jobs: {sorted(second_jobs)}"
    for log in second_jobs.values():
        assert "already holds this finished run" in log and "trainable of" not in log, log
    assert {p: (p / "metrics.json").stat().st_mtime_ns for p in points} == trained
    assert summary_statuses(sweep) == ["finished"] * 4


@NEEDS_CLUSTER
def test_failed_and_killed_slurm_points_are_recorded_and_the_others_finish(
    tmp_path, tiny_base, slurm_cluster
):
    # lr=-1 fails the schema check inside its job; one of the others is cancelled mid-training
    launcher = start_slurm_run(tmp_path, "objective.lr=-1,1e-3,3e-3")
    try:
        first = next(iter(wait_for_checkpoint(tmp_path, launcher)))
        killed = json.loads((first / "status.json").read_text())["slurm_job"]
        subprocess.run(["scancel", killed], check=True, timeout=30)
        output = launcher.communicate(timeout=300)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            cancel_jobs(tmp_path)
    assert launcher.returncode == 0, output
    (sweep,) = (tmp_path / "sweeps").iterdir()
    by_lr = {}
    for run_dir in run_dirs(sweep):
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        by_lr[re.search(r"objective\.lr=(\S+)", overrides).group(1)] = run_dir
    assert read_status(by_lr.pop("-1")) == "failed"
    logs = "".join(log.read_text() for log in sweep.glob("slurm/*/*_log.err"))
    assert "objective.lr" in logs, logs  # the failed job's stderr, findable in the sweep dir
    assert read_status(first) == "failed"
    assert "CANCELLED" in (first / "error.log").read_text()
    assert (first / "checkpoints" / "last.ckpt").exists()  # a re-run resumes it
    (other,) = [run_dir for run_dir in by_lr.values() if run_dir != first]
    assert read_status(other) == "finished"
    assert summary_statuses(sweep).count("finished") == 1


def cancel_jobs(output_dir: Path) -> None:
    """Never leave a job of a failed test behind (only this test's jobs: the cluster is shared)."""
    for job_dir in output_dir.glob("sweeps/*/slurm/*/"):
        subprocess.run(["scancel", job_dir.name], capture_output=True, timeout=30)


def wait_for_checkpoint(output_dir: Path, launcher: subprocess.Popen) -> list[Path]:
    """The run directories with a checkpoint, once training has saved the first one."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and launcher.poll() is None:
        if found := list(output_dir.glob("sweeps/*/*/checkpoints/last.ckpt")):
            return [path.parent.parent for path in found]
        time.sleep(0.05)
    launcher.kill()
    raise AssertionError(f"no checkpoint before the jobs ended:\n{launcher.communicate()[0]}")


def start_slurm_run(output_dir: Path, *overrides: str) -> subprocess.Popen:
    """A sweep through the Slurm launcher (one point without overrides); it waits for the jobs."""
    command = [sys.executable, str(REPO / "run.py"), "-m", *SLURM, *RESUME_ARGS, *overrides]
    return subprocess.Popen(
        [*command, f"paths.output_dir={output_dir}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def job_after_first_checkpoint(output_dir: Path, launcher: subprocess.Popen) -> tuple[str, Path]:
    """The Slurm job id and its folder, once training has saved its first checkpoint."""
    wait_for_checkpoint(output_dir, launcher)
    (job_dir,) = output_dir.glob("sweeps/*/slurm/*/")
    return job_dir.name, job_dir


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# the requeue signal Slurm sends before the time limit (#SBATCH --signal=USR2@...), and a
# requeue from outside (an admin, or preemption with PreemptMode=REQUEUE), which sends SIGTERM
INTERRUPTIONS = [
    pytest.param(["scancel", "--signal=USR2"], "lmstack: received SIGUSR2", id="requeue-signal"),
    pytest.param(
        ["scontrol", "requeue"], "Bypassing signal SIGTERM", id="scontrol-requeue", marks=SLOW
    ),
]


@NEEDS_CLUSTER
@pytest.mark.parametrize(("interrupt", "received"), INTERRUPTIONS)
def test_a_requeued_slurm_job_resumes_to_the_uninterrupted_result(
    interrupt, received, tmp_path, tiny_base, slurm_cluster
):
    straight = subprocess.Popen(  # the uninterrupted run, locally, meanwhile
        [sys.executable, str(REPO / "run.py"), *RESUME_ARGS, f"paths.output_dir={tmp_path}/s"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    launcher = start_slurm_run(tmp_path / "slurm")
    done = False
    try:
        job_id, job_dir = job_after_first_checkpoint(tmp_path / "slurm", launcher)
        subprocess.run([*interrupt, job_id], check=True, timeout=30)
        output = launcher.communicate(timeout=300)[0]
        assert launcher.returncode == 0, output
        assert straight.wait(timeout=300) == 0
        done = True
    finally:
        for process in (launcher, straight):
            if process.poll() is None:
                process.kill()
        if not done:
            cancel_jobs(tmp_path / "slurm")

    log = next(job_dir.glob("*_log.out")).read_text()
    saved = re.search(r"saved \S+/checkpoints/last\.ckpt at step (\d+)", log)
    resumed = re.search(r"resumed at step (\d+)", log)
    assert received in log and saved and resumed, log
    assert saved.group(1) == resumed.group(1), log  # from the checkpoint saved at the signal
    assert 0 < int(saved.group(1)) < 60
    restarts = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    assert "Restarts=1" in restarts, restarts

    (requeued,) = run_dirs(tmp_path / "slurm")
    (uninterrupted,) = run_dirs(tmp_path / "s")
    assert read_status(requeued) == "finished"
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (requeued, uninterrupted))
    for key in ("val/loss", "train/loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    got_weights, want_weights = adapter_weights(requeued), adapter_weights(uninterrupted)
    assert got_weights.keys() == want_weights.keys() and got_weights
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_joblib_sweep_finishes_its_points_in_one_sweep_dir(tmp_path, tiny_base):
    command = ["-m", "hydra/launcher=joblib", "trainer.num_threads=1", "logger=csv", *FAST]
    run_cli(*command, "verify.enabled=false", "seed=1,2", output_dir=tmp_path)
    (sweep,) = (tmp_path / "sweeps").iterdir()  # workers resolve the launcher's sweep dir
    points = run_dirs(sweep)
    assert len(points) == 2 and {read_status(p) for p in points} == {"finished"}


@pytest.mark.filterwarnings("ignore:The `srun` command is available")
def test_trainer_gets_the_slurm_plugin_only_under_slurm(monkeypatch, tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from lmstack.slurm import RequeueOnSignal, trainer_callbacks, trainer_plugins

    for name in [key for key in os.environ if key.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    assert trainer_plugins() == [] and trainer_callbacks(tmp_path) == []
    # what a job step launched by sbatch + srun sees
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "lmstack")
    (plugin,) = trainer_plugins()
    assert isinstance(plugin, SLURMEnvironment) and not plugin.auto_requeue
    (callback,) = trainer_callbacks(tmp_path)
    assert isinstance(callback, RequeueOnSignal)
    assert callback.checkpoint == tmp_path / "checkpoints" / "last.ckpt"


def test_a_slurm_sweep_without_slurm_stops_with_a_clear_error(tmp_path):
    venv_only = str(Path(sys.executable).parent)  # python, but no sbatch or srun
    result = run_cli(
        "-m", *SLURM, *FAST, output_dir=tmp_path, check=False, env={"PATH": venv_only}
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert "hydra/launcher=slurm: sbatch and srun not found on PATH" in output
    assert "hydra/launcher=joblib" in output  # and what to do instead
    assert not run_dirs(tmp_path)  # nothing was submitted or run


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs sbatch (Slurm's client)")
def test_a_slurm_sweep_whose_controller_is_down_names_sbatchs_answer(tmp_path):
    conf = tmp_path / "slurm.conf"  # a cluster whose controller nobody runs
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n")
    result = run_cli(
        "-m", *SLURM, *FAST, output_dir=tmp_path, check=False, env={"SLURM_CONF": str(conf)}
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert "hydra/launcher=slurm: sbatch refused the sweep's jobs" in output
    assert "Unable to contact slurm controller" in output


@NEEDS_CLUSTER
@SLOW  # about 3 min on 2 cores (two DDP tasks, a requeue); the suite budget
def test_a_two_task_slurm_point_writes_one_set_of_records_and_resumes_after_requeue(
    tmp_path, tiny_base, slurm_cluster
):
    """trainer.devices=2 on the Slurm launcher: one job of 2 tasks (DDP ranks from srun);
    rank zero alone writes the records and the one W&B run; the requeue signal reaches both
    tasks, which leave at the same step, and the requeued job resumes from that checkpoint."""
    args = [a for a in RESUME_ARGS if a != "logger=csv"]
    command = ["-m", *(a for a in SLURM if a != "logger=csv"), *args, "logger=wandb"]
    command += ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *command, f"paths.output_dir={tmp_path}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    done = False
    try:
        job_id, job_dir = job_after_first_checkpoint(tmp_path, launcher)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        output = launcher.communicate(timeout=600)[0]
        assert launcher.returncode == 0, output
        done = True
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if not done:
            cancel_jobs(tmp_path)

    logs = "".join(path.read_text() for path in sorted(job_dir.glob("*_log.*")))
    assert "MEMBER: 2/2" in logs, logs[-3000:]  # two ranks, wired by Lightning's SLURMEnvironment
    saved = re.search(r"saved \S+/checkpoints/last\.ckpt at step (\d+)", logs)
    resumed = re.search(r"resumed at step (\d+)", logs)
    assert saved and resumed and saved.group(1) == resumed.group(1), logs[-3000:]
    (point,) = run_dirs(tmp_path)
    assert read_status(point) == "finished"
    assert (point / "adapter" / "adapter_model.safetensors").exists()
    # one W&B run (rank zero's), continued by the requeued job: one run id in its folders
    runs = {path.name.rsplit("-", 1)[-1] for path in point.glob("wandb/offline-run-*")}
    assert len(runs) == 1, sorted(point.glob("wandb/*"))
    assert json.loads((point / "metrics.json").read_text())["train/loss"] > 0
