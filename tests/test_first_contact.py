"""What a new user meets first: where the run is, a quiet demo, a lock file replayed on a
fresh machine, and a status.json that stays true when a run is stopped or re-run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, run_cli, run_dirs, start_cli

# a short run of the default demo: its logger (W&B, offline), its progress bar
DEMO_FEW_STEPS = [
    "trainer.max_steps=4",
    "data.train_size=96",
    "data.eval_size=16",
    "data.batch_size=8",
    "trainer.log_every_n_steps=2",
    "verify.num_prompts=4",
    "verify.max_new_tokens=8",
]
# what a library prints that a user of the demo cannot act on
NOISE = (
    re.compile(r"warning", re.IGNORECASE),
    re.compile(r"Epoch \d+/-\d"),
    re.compile(r"Writing model shards"),
    re.compile(r"Loading checkpoint shards"),
    re.compile(r"Traceback"),
)


def is_lmstack_or_bar(line: str) -> bool:
    """lmstack's lines, what it indents under them, Lightning's bar (and its wrapped metrics);
    a library's message ("FutureWarning: ...", "[transformers] ...", "Failed to load ...")
    starts at the left margin with something else."""
    return not line.strip() or line.startswith(("lmstack: ", " ")) or "━" in line


def numeric(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "train/seconds"}


def test_the_demo_says_where_it_runs_and_prints_no_library_noise(tmp_path, tiny_base):
    result = run_cli(*DEMO_FEW_STEPS, "export.merge=true", output_dir=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    run_id = json.loads((run_dir / "status.json").read_text())["run_id"]
    lines = result.stdout.splitlines()
    assert lines[0] == f"lmstack: run {run_id} starts in {run_dir.resolve()}"
    assert lines[-1] == f"lmstack: run {run_id} finished; results in {run_dir.resolve()}"
    output = (result.stdout + result.stderr).replace("\r", "\n")
    noisy = [line for line in output.splitlines() if any(p.search(line) for p in NOISE)]
    # strict: every line is lmstack's own (or indented under one) or the training bar's
    noisy += [line for line in output.splitlines() if not is_lmstack_or_bar(line)]
    assert not noisy, "\n".join(noisy)
    assert "(to step 4)" in output  # the bar's label for step-bounded training
    assert_wandb_records_the_lock(run_dir)


def wandb_config(run_dir: Path) -> dict:
    """The config recorded in the W&B offline run file under run_dir."""
    from test_train import wandb_records
    from wandb.proto import wandb_internal_pb2

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config = {}
    for payload in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else []
        items = record.config.update if kind == "config" else items
        config |= {item.key: json.loads(item.value_json) for item in items}
    return config


def assert_wandb_records_the_lock(run_dir: Path) -> None:
    """The W&B run's config carries the provenance its lock file has."""
    import yaml

    lock = wandb_config(run_dir)["lock"]
    replay = yaml.safe_load((run_dir / "recipe.lock.yaml").read_text())["lock"]
    assert lock["packages"]["torch"] and lock["data_fingerprint"].startswith("builtin:")
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert lock["code_version"] == git.stdout.strip() == replay["code_version"]
    assert lock["run_id"] == replay["run_id"] == run_dir.name


def replay_on_empty_cache(model: str, tmp_path: Path) -> None:
    """Run, then replay its lock file with a fresh cache and output dir: the same run id and
    the same metrics, though the replay builds the built-in model first."""
    run_cli(
        *FAST, "trainer.max_steps=3", f"model={model}", "logger=none", output_dir=tmp_path / "first"
    )
    (first,) = run_dirs(tmp_path / "first")
    lock = first / "recipe.lock.yaml"
    cache = tmp_path / "empty-cache"
    replay = run_cli(
        f"recipe={lock}",
        output_dir=tmp_path / "replay",
        env={"LMSTACK_CACHE_DIR": str(cache)},
        timeout=1800,  # building tiny_base takes ~1 min on 2 idle cores, far more on busy ones
    )
    assert "building" in replay.stdout or list(cache.glob(f"tiny_*{os.sep}config.json"))
    (second,) = run_dirs(tmp_path / "replay")
    assert second.name == first.name
    want = numeric(json.loads((first / "metrics.json").read_text()))
    got = numeric(json.loads((second / "metrics.json").read_text()))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


@pytest.mark.slow
def test_a_lock_replayed_on_an_empty_cache_reproduces_the_run(tmp_path, tiny_random):
    replay_on_empty_cache("tiny_random", tmp_path)


@pytest.mark.slow
def test_a_lock_replayed_on_an_empty_cache_reproduces_the_demo(tmp_path, tiny_base):
    replay_on_empty_cache("tiny_base", tmp_path)


# ---- status.json after a signal


def start(*args: str, output: Path) -> subprocess.Popen:
    """run.py in its own process group, as a shell starts a command (Ctrl-C reaches the group)."""
    output_dir = f"paths.output_dir={output}"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    return start_cli(*args, output_dir, **pipes, start_new_session=True)


def stop(process: subprocess.Popen, signame: str) -> None:
    """Ctrl-C in a terminal signals the whole foreground group (engines and pipeline stages
    too); `kill` and schedulers send SIGTERM to the main process only."""
    if signame == "SIGINT":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)


def wait_for(process: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if process.poll() is not None:
            raise AssertionError(f"ended before it could be stopped:\n{process.stdout.read()}")
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("never got to the point where it is stopped")


def status_of(output: Path) -> dict:
    statuses = [json.loads(p.read_text()) for p in output.rglob("status.json")]
    return statuses[0] if len(statuses) == 1 else {}


def all_running(output: Path) -> bool:
    statuses = [json.loads(p.read_text()) for p in output.rglob("status.json")]
    return bool(statuses) and all(s.get("status") == "running" for s in statuses)


def running(output: Path):
    return lambda: all_running(output)


def exists(output: Path, pattern: str):
    return lambda: all_running(output) and bool(list(output.rglob(pattern)))


# phase -> (its arguments, when it is in the middle of its work)
PHASES = {
    "train": (
        [
            *FAST,
            "trainer.max_steps=400",
            "trainer.checkpoint_every_n_steps=1",
            "verify.enabled=false",
            "logger=none",
        ],
        lambda out: exists(out, "checkpoints/last.ckpt"),
    ),
    "serve": (["phase=serve", "logger=none"], lambda out: exists(out, "endpoint.json")),
    "bench": (
        ["phase=bench", "logger=none", "bench.num_requests=400", "bench.max_tokens=16"],
        lambda out: exists(out, "traces.sqlite"),
    ),
    "eval": (["phase=eval", "eval=verifier", "eval.num_prompts=400", "logger=none"], running),
    "pipeline": (
        ["recipe=arith_sft_dpo", *FAST, "logger=none"],
        lambda out: exists(out, "runs/sft-*/status.json"),
    ),
    # the labelling page runs until it is stopped: that is its normal end ("stopped", exit 0)
    "label": (
        ["phase=label", "label.port=0", "label.items={inputs}/pairs.jsonl", "logger=none"],
        lambda out: exists(out, "label_server.json"),
    ),
}
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
# the quick ones run by default (a few seconds each); train, bench and serve's Ctrl-C are slow
DEFAULT_CASES = {
    ("serve", "SIGTERM"),
    *((p, s) for p in ("eval", "pipeline", "label") for s in SIGNALS),
}
PAIR = {"prompt": "2 + 2?", "answer_a": "4", "answer_b": "5", "model_a": "a", "model_b": "b"}


@pytest.mark.parametrize(
    ("phase", "signame"),
    [
        pytest.param(p, s, marks=() if (p, s) in DEFAULT_CASES else pytest.mark.slow)
        for p in PHASES
        for s in SIGNALS
    ],
)
def test_a_stopped_run_is_recorded_as_interrupted(phase, signame, tmp_path, tiny_base):
    inputs, output_dir = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    (inputs / "pairs.jsonl").write_text(json.dumps(PAIR) + "\n")
    args, ready = PHASES[phase]
    process = start(*(a.format(inputs=inputs) for a in args), output=output_dir)
    wait_for(process, ready(output_dir))
    stop(process, signame)
    try:
        output = process.communicate(timeout=120)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left of its group, if any
            os.killpg(process.pid, signal.SIGKILL)
    assert "Traceback" not in output, output[-3000:]
    statuses = {p.parent.name: json.loads(p.read_text()) for p in output_dir.rglob("status.json")}
    assert statuses, output[-3000:]
    if phase == "label":
        assert process.returncode == 0, output[-3000:]
        assert [s["status"] for s in statuses.values()] == ["stopped"], statuses
        assert "error" not in next(iter(statuses.values()))
        assert "stopping the labelling page" in output
        return
    assert process.returncode == 128 + SIGNALS[signame], output[-3000:]
    for name, status in statuses.items():
        # a message, not a tuple: pytest would shorten the output in a tuple's repr
        assert status["status"] == "interrupted", f"{name}: {status}\n{output[-3000:]}"
        assert "stopped by SIG" in status["error"]  # a pipeline stops its stage with SIGTERM
    assert any(f"stopped by {signame}" in status["error"] for status in statuses.values())
    assert f"interrupted by {signame}" in output


def run_task_in_process(phase, tmp_path: Path, monkeypatch) -> int:
    """launch.run_task on the default config, as Hydra calls it, with `phase` standing in for
    the phase's work; returns its exit status."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from lmstack import launch
    from lmstack.config.store import register_configs
    from lmstack.tracking.identity import register_resolvers

    register_configs()
    register_resolvers()
    monkeypatch.setattr(launch, "dispatch", phase)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["logger=none"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # unset again after the test
    HydraConfig.instance().set_config(cfg)
    del cfg.hydra  # as Hydra hands the task its config
    with pytest.raises(SystemExit) as stop:
        launch.run_task(cfg)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run's handler is gone
    return stop.value.code


def assert_stopped_by_sigterm(code: int, run_dir: Path) -> None:
    assert code == 128 + signal.SIGTERM
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted", status
    assert status["error"] == "stopped by SIGTERM; re-run the command to resume"


def test_a_signal_a_library_swallowed_still_ends_the_run_as_interrupted(
    tmp_path, monkeypatch, capsys
):
    """A stop signal that lands inside an import (numpy's, under Lightning's) can be caught
    there, leaving a half-imported module that fails later with some other error: that run was
    stopped, not broken, and says so without a traceback."""

    def phase_whose_library_swallows_the_signal(ctx):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at once; the sleep is never finished
        except KeyboardInterrupt:
            pass  # as a library's own clean-up might
        raise AttributeError("module 'numpy._core' has no attribute '_multiarray_umath'")

    code = run_task_in_process(phase_whose_library_swallows_the_signal, tmp_path, monkeypatch)
    assert_stopped_by_sigterm(code, tmp_path)
    assert "_multiarray_umath" in (tmp_path / "error.log").read_text()  # what it cut short
    assert "interrupted by SIGTERM" in capsys.readouterr().out


def test_a_signal_repeated_after_one_was_swallowed_stops_the_run(tmp_path, monkeypatch):
    """A signal whose KeyboardInterrupt library code caught and went on from leaves the run
    going: the same signal sent again stops it, but not when it comes in the same burst (Ctrl-C
    and a pipeline's SIGTERM together), which would cut short the unwinding the first began."""
    from lmstack.launch import REPEAT_INTERRUPTS_AFTER_S

    reached = []

    def phase_that_goes_on_after_a_swallowed_signal(ctx):
        with contextlib.suppress(KeyboardInterrupt):  # as a library's clean-up might
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at once; the sleep is never finished
        os.kill(os.getpid(), signal.SIGINT)  # the same burst: no second interrupt
        reached.append("after the burst")
        time.sleep(REPEAT_INTERRUPTS_AFTER_S + 0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's repeat
        time.sleep(5)
        reached.append("after the repeat")

    code = run_task_in_process(phase_that_goes_on_after_a_swallowed_signal, tmp_path, monkeypatch)
    assert_stopped_by_sigterm(code, tmp_path)
    assert reached == ["after the burst"]


def test_a_signal_that_lands_in_a_finalizer_still_stops_the_run(tmp_path, monkeypatch):
    """The garbage collector runs a __del__ at any moment (regex's, during an import), and an
    exception raised in one is printed and dropped: the signal is handled again outside it."""
    reached = []

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside the finalizer
            reached.append("the finalizer's end")

    def phase_whose_signal_lands_in_a_finalizer(ctx):
        Finalized()  # dropped at once: its __del__ runs
        time.sleep(5)  # the signal, sent again, interrupts this
        reached.append("past the sleep")

    code = run_task_in_process(phase_whose_signal_lands_in_a_finalizer, tmp_path, monkeypatch)
    assert_stopped_by_sigterm(code, tmp_path)
    assert reached == ["the finalizer's end"]


@pytest.mark.slow
def test_an_interrupted_run_rerun_to_the_end_drops_its_error(tmp_path, tiny_base):
    args, ready = PHASES["train"]
    args = [a for a in args if not a.startswith("trainer.max_steps")] + ["trainer.max_steps=12"]
    process = start(*args, output=tmp_path)
    wait_for(process, ready(tmp_path))
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert status_of(tmp_path)["status"] == "interrupted"
    run_cli(*args, output_dir=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and "error" not in status
    assert not (run_dir / "error.log").exists()


def test_a_status_drops_the_error_of_an_earlier_attempt(tmp_path):
    from lmstack.tracking.run_dir import read_json, set_status

    set_status(tmp_path, "failed", error="ValueError: boom")
    set_status(tmp_path, "running", run_id="x")
    assert read_json(tmp_path / "status.json") == {
        "status": "running",
        "run_id": "x",
        "updated": read_json(tmp_path / "status.json")["updated"],
    }
