"""Shared fixtures: the real run.py in a subprocess, and lmstack's built-in tiny model.

The built-in base is cached in the repository's .cache/lmstack (as `make run`
does), so the suite builds it at most once per machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("LMSTACK_CACHE_DIR", REPO / ".cache" / "lmstack"))

os.environ.setdefault("LMSTACK_CACHE_DIR", str(CACHE_DIR))
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# small, fast settings shared by the end-to-end tests
FAST = [
    "trainer.max_steps=6",
    "trainer.checkpoint_every_n_steps=3",
    "trainer.enable_progress_bar=false",
    "data.train_size=96",
    "data.eval_size=16",
    "data.batch_size=8",
    "verify.num_prompts=8",
    "verify.max_new_tokens=12",
]


def run_cli(
    *args: str,
    output_dir: Path,
    timeout: float = 600,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python run.py ARGS paths.output_dir=OUTPUT_DIR` as a user would type it."""
    command = [sys.executable, str(REPO / "run.py"), *args, f"paths.output_dir={output_dir}"]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"run.py {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    from lmstack.config.groups.model import TinyLlamaConfig
    from lmstack.models.builtin import ensure_builtin_model

    return ensure_builtin_model(TinyLlamaConfig(), pretrained=True, cache_dir=CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_random() -> Path:
    from lmstack.config.groups.model import TinyLlamaConfig
    from lmstack.models.builtin import ensure_builtin_model

    return ensure_builtin_model(TinyLlamaConfig(), pretrained=False, cache_dir=CACHE_DIR)


def assert_rejected_early(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2 with every fragment in the output, before any model was loaded."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    assert "trainable of" not in output and "Traceback" not in output, output


def run_dirs(output_dir: Path) -> list[Path]:
    """Every run directory under an output dir (single runs and sweep points)."""
    return sorted(path.parent for path in output_dir.rglob("status.json"))


def kill_at_first_checkpoint(*args: str, watch: Path) -> None:
    """`python run.py ARGS`, SIGKILLed (with its children) once a checkpoint appears under
    `watch`: a run killed mid-training, as a crash or an OOM kill would leave it."""
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if list(watch.rglob("checkpoints/last.ckpt")):
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
