"""phase=serve and phase=bench on a real `transformers serve` engine, end to end.

A tiny SFT run is trained once; the tests serve it, talk to it with the official
`openai` client, benchmark it, feed it bad input, and check that no engine
process outlives its job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import CACHE_DIR, assert_rejected_early, run_cli, run_dirs, start_cli

QUESTION = "Ann has 3 apples and gets 4 more. How many apples does Ann have now?"
BENCH = ["phase=bench", "logger=none", "bench.num_requests=6", "bench.max_tokens=8"]


def engines_serving(path_fragment: str) -> list[psutil.Process]:
    """Live engine processes whose command line names `path_fragment`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "transformers" in cmdline and " serve " in cmdline and path_fragment in cmdline:
            found.append(process)
    return found


def start_serve(
    run_dir: Path, output: Path, *extra: str, timeout_s: float = 240
) -> tuple[subprocess.Popen, dict]:
    """`python run.py phase=serve` in the background; returns it once the URL is printed."""
    args = ["phase=serve", f"serving.model={run_dir}", "logger=none", f"paths.output_dir={output}"]
    process = start_cli(*args, *extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if "stop:  Ctrl-C" in line:
            (endpoint_file,) = output.rglob("endpoint.json")
            return process, json.loads(endpoint_file.read_text())
    process.kill()
    raise AssertionError("phase=serve never printed its URL:\n" + "".join(lines))


def greedy_reply(model_dir: Path, question: str, max_new_tokens: int) -> str:
    """What the run's own model and chat template answer, in process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_openai_client_chats_with_a_served_run(sft_run, tmp_path):
    from openai import OpenAI

    process, endpoint = start_serve(sft_run, tmp_path, "serving.gateway=false")
    try:
        client = OpenAI(base_url=endpoint["base_url"], api_key="EMPTY")
        messages = [{"role": "user", "content": QUESTION}]
        reply = client.chat.completions.create(
            model=endpoint["model"], messages=messages, max_tokens=16, temperature=0
        )
        pieces = client.chat.completions.create(
            model=endpoint["model"], messages=messages, max_tokens=16, temperature=0, stream=True
        )
        streamed = "".join(
            chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices
        )
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    # the served model answers exactly as the run's model does with the run's chat template
    (merged,) = CACHE_DIR.glob(f"merged_runs/{sft_run.name}-*/merged")  # merged for serving
    expected = greedy_reply(merged, QUESTION, 16)
    assert reply.choices[0].message.content == expected
    assert streamed == expected
    assert (
        endpoint["served"]["run_id"] == json.loads((sft_run / "status.json").read_text())["run_id"]
    )
    assert not engines_serving(str(sft_run)), "the engine outlived phase=serve"


@pytest.mark.e2e
def test_bench_grid_over_quantization_and_concurrency(sft_run, tmp_path):
    run_cli(
        "-m", *BENCH, f"serving.model={sft_run}", "serving.gateway=false",
        "serving.quantization=none,nf4", "bench.max_concurrency=1,4", output_dir=tmp_path,
    )  # fmt: skip
    points = run_dirs(tmp_path)
    assert len(points) == 4
    assert sum("nf4" in point.name for point in points) == 2
    for point in points:
        engine_log = (point / "engine-hf.log").read_text()
        assert ("--quantization bnb-4bit" in engine_log) == ("nf4" in point.name)
        # serving.num_threads=-1 (default): the engine leaves a core to the client and server
        threads = max(1, len(os.sched_getaffinity(0)) - 1)
        assert engine_log.startswith(f"$ env OMP_NUM_THREADS={threads} ")
        metrics = json.loads((point / "metrics.json").read_text())
        assert metrics["bench/completed"] == 6 and metrics["bench/failed"] == 0
        for figure in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "p50", "p90", "p99"):
                assert metrics[f"bench/{figure}_ms_{stat}"] > 0
        # ignore_eos: every request generates bench.max_tokens tokens
        assert metrics["bench/output_tokens"] == 6 * 8
        assert len((point / "requests.jsonl").read_text().splitlines()) == 6
    assert not engines_serving(str(sft_run))


def test_rejected_requests_are_counted_and_the_bench_goes_on(sft_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    good = {"messages": [{"role": "user", "content": QUESTION}]}
    # transformers serve answers unknown body fields with 422
    bad = {"messages": [{"role": "user", "content": QUESTION}], "request": {"bogus_field": 1}}
    prompts.write_text("\n".join(json.dumps(row) for row in (good, bad, good, bad)) + "\n")
    run_cli(
        *BENCH, f"serving.model={sft_run}", "serving.gateway=false", f"bench.prompts={prompts}",
        "bench.warmup_requests=0", "bench.num_requests=4", output_dir=tmp_path / "out",
    )  # fmt: skip
    (point,) = run_dirs(tmp_path / "out")
    metrics = json.loads((point / "metrics.json").read_text())
    assert metrics["bench/completed"] == 2 and metrics["bench/failed"] == 2
    (reason,) = metrics["bench/failure_reasons"]
    assert reason.startswith("HTTP 422") and "bogus_field" in reason
    assert not engines_serving(str(sft_run))


def test_unknown_model_path(tmp_path):
    result = run_cli(
        *BENCH, f"serving.model={tmp_path / 'nowhere'}", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, "serving.model", "nowhere")


def test_unknown_bench_metric(tmp_path):
    result = run_cli(*BENCH, "bench.metric=speed", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "bench.metric: 'speed' is not one of", "output_throughput")


def test_port_in_use(sft_run, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            *BENCH, f"serving.model={sft_run}", f"serving.port={port}",
            output_dir=tmp_path, check=False,
        )  # fmt: skip
    assert_rejected_early(result, "serving.port", f"127.0.0.1:{port} is already in use")


def test_engine_that_dies_before_healthy_shows_its_log(sft_run, tmp_path):
    result = run_cli(
        *BENCH, f"serving.model={sft_run}", "serving.extra_args=[--no-such-flag]",
        output_dir=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "ended (exit " in result.stderr and "no-such-flag" in result.stderr
    assert not engines_serving(str(sft_run))


def test_engine_that_never_gets_healthy_times_out(sft_run, tmp_path):
    result = run_cli(
        *BENCH, f"serving.model={sft_run}", "serving.startup_timeout_s=0.5",
        output_dir=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "serving.startup_timeout_s: the engine was not healthy" in result.stderr
    assert "last log lines" in result.stderr
    assert not engines_serving(str(sft_run))


def test_unreachable_external_server(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli(
        *BENCH, "serving=external", f"serving.base_url=http://127.0.0.1:{port}/v1",
        output_dir=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"serving.base_url: http://127.0.0.1:{port}/v1/models did not answer" in result.stderr


@pytest.mark.gpu
def test_vllm_serves_and_benches_a_run(sft_run, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: vLLM's wheels run on GPUs only")
    pytest.importorskip("vllm", reason="needs vLLM: pip install -e '.[vllm]'")
    run_cli(
        *BENCH, "serving=vllm", f"serving.model={sft_run}", "serving.gateway=false",
        "bench.max_concurrency=4", output_dir=tmp_path, env={"VLLM_LOGGING_LEVEL": "WARNING"},
    )  # fmt: skip
    (point,) = run_dirs(tmp_path)
    metrics = json.loads((point / "metrics.json").read_text())
    assert metrics["bench/completed"] == 6 and metrics["bench/engine"] == "vllm"
    assert os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""
