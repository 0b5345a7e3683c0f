"""Shared fixtures: the real run.py in a subprocess, and lmstack's built-in tiny model.

The built-in base is cached in the repository's .cache/lmstack (as `make run`
does), so the suite builds it at most once per machine.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


@contextlib.contextmanager
def openai_server(
    model_id: str, reply: Callable[[dict, Any], dict], protocol_version: str = "HTTP/1.0"
) -> Iterator[str]:
    """A real OpenAI-compatible HTTP server on a free port; yields its /v1 base URL.

    GET (/v1/models) lists `model_id`; a POST is answered with `reply(body, headers)`, the
    JSON response body (see `chat_answer`); `headers` is case-insensitive."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output clean
            pass

        def _send(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": model_id}]})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._send(reply(request, self.headers))

    Handler.protocol_version = protocol_version
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def chat_answer(content: str, **fields) -> dict:
    """A chat.completion response body whose one choice says `content`."""
    message = {"role": "assistant", "content": content}
    return {"choices": [{"index": 0, "message": message, **fields}]}


@pytest.fixture(scope="module")
def bubblewrap() -> None:
    """Code runs in eval=humaneval's sandbox: skips without bwrap unless
    LMSTACK_REQUIRE_SANDBOX=1 (CI sets it: there a missing bwrap fails)."""
    if shutil.which("bwrap") is None:
        if os.environ.get("LMSTACK_REQUIRE_SANDBOX") == "1":
            pytest.fail("LMSTACK_REQUIRE_SANDBOX=1, but no bwrap: apt-get install bubblewrap")
        pytest.skip("no bwrap (apt-get install bubblewrap)")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A short SFT run of the built-in model (LoRA), made once per test module."""
    output = tmp_path_factory.mktemp("sft")
    run_cli(*FAST, "logger=none", "trainer.num_threads=1", output_dir=output)
    (run_dir,) = run_dirs(output)
    return run_dir


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


def assert_rejected(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2 with every fragment in the output and no traceback; returns the output."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    assert "Traceback" not in output, output
    return output


def assert_rejected_early(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """`assert_rejected`, and before any model was loaded."""
    output = assert_rejected(result, *fragments)
    assert "trainable of" not in output, output


def data_config(**overrides) -> SimpleNamespace:
    """The `data` config group as the data layer reads it: local rows, the built-in task's
    sizes, and `overrides`."""
    from lmstack.config.groups.eval_math import DEFAULT_MATH_GENERATORS

    base = dict(
        source="jsonl",
        path=None,
        subset=None,
        split="train",
        eval_split=None,
        eval_path=None,
        format="auto",
        seed=0,
        eval_fraction=0.25,
        task="arith",
        math_generators=copy.deepcopy(DEFAULT_MATH_GENERATORS),
        train_size=8,
        eval_size=4,
    )
    return SimpleNamespace(**(base | overrides))


def run_one(*args: str, output_dir: Path, **options) -> tuple[Path, dict]:
    """`run_cli` of a run that makes one run directory: that directory and its metrics."""
    run_cli(*args, output_dir=output_dir, **options)
    (run_dir,) = run_dirs(output_dir)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def run_dirs(output_dir: Path) -> list[Path]:
    """Every run directory under an output dir (single runs and sweep points)."""
    return sorted(path.parent for path in output_dir.rglob("status.json"))


def start_cli(*args: str, **popen_options) -> subprocess.Popen:
    """`python run.py ARGS` in the background (text output), as a user would start it."""
    command = [sys.executable, str(REPO / "run.py"), *args]
    return subprocess.Popen(command, cwd=REPO, text=True, **popen_options)


def adapter_weights(output_dir: Path) -> dict:
    """The trained adapter of the one run under `output_dir`, as tensors."""
    from safetensors.torch import load_file  # torch: only the tests that train need it

    (run_dir,) = run_dirs(output_dir)
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_resumes_to_the_straight_result(args: list[str], tmp_path: Path) -> None:
    """A run killed at its first checkpoint and run again resumes from it, and ends with the
    same adapter weights as the run left uninterrupted."""
    import torch  # only the tests that train need it

    killed = tmp_path / "killed"
    kill_at_first_checkpoint(*args, f"paths.output_dir={killed}", watch=killed)
    (run_dir,) = run_dirs(killed)
    assert not (run_dir / "metrics.json").exists()
    resumed = run_cli(*args, output_dir=killed)
    assert "resuming from" in resumed.stdout
    run_cli(*args, output_dir=tmp_path / "straight")
    got, want = adapter_weights(killed), adapter_weights(tmp_path / "straight")
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def kill_at_first_checkpoint(*args: str, watch: Path) -> None:
    """`python run.py ARGS`, SIGKILLed (with its children) once a checkpoint appears under
    `watch`: a run killed mid-training, as a crash or an OOM kill would leave it."""
    import signal
    import time

    process = start_cli(
        *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
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
