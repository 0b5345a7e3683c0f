"""The engines in their own environments: vLLM's CPU build and llama.cpp, end to end.

One tiny SFT run is trained once. One vLLM engine serves its merged model for the chat,
stream, bench-grid and served-eval tests (they reach it as `serving=external`, so the engine
starts once); base + adapter, and the three engines side by side, start their own. Needs
`make engines` (CI runs it and sets LMSTACK_REQUIRE_ENGINES=1: missing engines fail there
instead of skipping).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import psutil
import pytest
from test_ab import variants_override
from test_serving import QUESTION, greedy_reply, start_serve

from lmstack.util.cpu_kind import llamacpp_level

from conftest import CACHE_DIR, FAST, REPO, assert_rejected_early, run_cli, run_dirs

ENGINES_DIR = Path(os.environ.get("LMSTACK_ENGINES_DIR", REPO / ".cache" / "engines"))
VLLM_PYTHON = ENGINES_DIR / "vllm" / "bin" / "python"
LLAMA_SERVER = ENGINES_DIR / "llamacpp" / "bin" / "llama-server"
BENCH = ["phase=bench", "logger=none", "bench.num_requests=6", "bench.max_tokens=8"]
EVAL = ["phase=eval", "eval=[verifier]", "eval.num_prompts=12", "logger=none"]
SCRATCH = CACHE_DIR / "scratch"
# tests that start an engine: `make test-integration` (and CI) runs them, `make test` does not
NEEDS_ENGINES = pytest.mark.engines


def require(path: Path) -> None:
    if path.exists():
        return
    message = f"needs {path}: run `make engines`"
    if os.environ.get("LMSTACK_REQUIRE_ENGINES"):
        pytest.fail(message)
    pytest.skip(message)


def engine_processes() -> list[str]:
    """Command lines of live vLLM and llama.cpp engines."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        argv = process.info["cmdline"] or [""]
        if "vllm.entrypoints.openai.api_server" in argv or argv[0].endswith("/llama-server"):
            found.append(" ".join(argv))
    return found


def assert_nothing_left() -> None:
    """No vLLM or llama.cpp engine alive, no engine scratch folder left."""
    assert not engine_processes(), engine_processes()
    assert not SCRATCH.exists() or not any(SCRATCH.iterdir()), list(SCRATCH.iterdir())


# ---- bad input: answered before (or as) an engine starts, nothing left running ----


def test_another_engines_key_is_unknown(tmp_path):
    result = run_cli(
        *BENCH, "serving=vllm", "serving.cb_num_blocks=-5", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, "cb_num_blocks")


@NEEDS_ENGINES
def test_quantization_the_engine_cannot_do_here(tmp_path):
    require(VLLM_PYTHON)
    result = run_cli(
        *BENCH, "serving=vllm", "serving.quantization=fp8", output_dir=tmp_path, check=False
    )
    assert_rejected_early(
        result, "serving.quantization: 'fp8' is not supported by serving=vllm", "cpu"
    )


def test_missing_engine_environment(tmp_path):
    empty = tmp_path / "no-engines"
    for engine in ("vllm", "llamacpp"):
        result = run_cli(
            *BENCH, f"serving={engine}", output_dir=tmp_path, check=False,
            env={"LMSTACK_ENGINES_DIR": str(empty)},
        )  # fmt: skip
        assert_rejected_early(result, f"serving={engine}", "make engines")
    result = run_cli(
        *BENCH, "serving=vllm", f"serving.python={empty}/python", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, "serving.python", "make engines")


@NEEDS_ENGINES
def test_broken_engine_environment_shows_the_engines_own_log(tmp_path, tiny_base):
    """lmstack's own Python has no vLLM: the engine dies at start-up, exit 2 with its log."""
    result = run_cli(
        *BENCH, "serving=vllm", f"serving.python={REPO / '.venv' / 'bin' / 'python'}",
        output_dir=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "ended (exit 1) before it was healthy" in result.stderr
    assert "No module named 'vllm'" in result.stderr
    assert "Traceback" not in result.stderr.split("last log lines")[0]
    assert_nothing_left()


# ---- vLLM (CPU build) serving a trained run ----


@pytest.fixture(scope="class")
def vllm_endpoint(sft_run, tmp_path_factory):
    """`phase=serve serving=vllm` on the run's merged model, through the tracing gateway."""
    require(VLLM_PYTHON)
    output = tmp_path_factory.mktemp("vllm-serve")
    process, endpoint = start_serve(sft_run, output, "serving=vllm", timeout_s=900)
    try:
        yield endpoint
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        assert_nothing_left()


def external(endpoint: dict) -> list[str]:
    """The running vLLM engine, reached as any OpenAI-compatible server."""
    return [
        "serving=external",
        f"serving.base_url={endpoint['base_url']}",
        f"serving.served_model_name={endpoint['model']}",
        "serving.gateway=false",
    ]


def verifier_answers(output: Path) -> list[str]:
    (path,) = output.rglob("verifier_samples.jsonl")
    return [json.loads(line)["responses"][0] for line in path.read_text().splitlines()]


def local_and_served_answers(run: Path, output: Path, *serving: str) -> tuple[list, list]:
    """The run's greedy verifier answers in process (output/local) and served with the
    `serving` overrides (eval.target=served, output/served); the served run's output in
    output/served.out."""
    run_cli(*EVAL, f"model.init_from={run}", output_dir=output / "local")
    served = ("eval.target=served", *serving)
    result = run_cli(*EVAL, f"model.init_from={run}", *served, output_dir=output / "served")
    (output / "served.out").write_text(result.stdout)
    return verifier_answers(output / "local"), verifier_answers(output / "served")


@NEEDS_ENGINES
class TestOneVllmEngine:
    """Tests sharing one vLLM engine (started once, stopped after the last of them)."""

    def test_vllm_chats_and_streams_the_runs_greedy_answer(self, sft_run, vllm_endpoint):
        from openai import OpenAI

        client = OpenAI(base_url=vllm_endpoint["base_url"], api_key="EMPTY")
        messages = [{"role": "user", "content": QUESTION}]
        ask = {"model": vllm_endpoint["model"], "messages": messages, "max_tokens": 16}
        reply = client.chat.completions.create(**ask, temperature=0)
        pieces = client.chat.completions.create(**ask, temperature=0, stream=True)
        streamed = "".join(
            chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices
        )
        from lmstack.models.loading import model_from_run

        expected = greedy_reply(model_from_run(sft_run), QUESTION, 16)
        assert reply.choices[0].message.content == expected
        assert streamed == expected
        assert vllm_endpoint["engine"] == "vllm"
        assert (
            vllm_endpoint["served"]["run_id"]
            == json.loads((sft_run / "status.json").read_text())["run_id"]
        )

    def test_vllm_bench_grid_over_concurrency(self, vllm_endpoint, tmp_path):
        run_cli(
            "-m", *BENCH, *external(vllm_endpoint), "bench.max_concurrency=1,4", output_dir=tmp_path
        )
        points = run_dirs(tmp_path)
        assert len(points) == 2
        for point in points:
            metrics = json.loads((point / "metrics.json").read_text())
            assert metrics["bench/completed"] == 6 and metrics["bench/failed"] == 0
            assert metrics["bench/output_tokens"] == 6 * 8  # ignore_eos: every answer full length
            assert metrics["bench/ttft_ms_p50"] > 0 and metrics["bench/output_throughput"] > 0
        assert list((tmp_path / "sweeps").rglob("summary.md"))

    def test_vllm_served_eval_gives_the_in_process_greedy_answers(
        self, sft_run, vllm_endpoint, tmp_path
    ):
        local, served = local_and_served_answers(sft_run, tmp_path, *external(vllm_endpoint))
        assert len(local) == 12 and served == local

    def test_vllm_accepts_what_the_gateway_lets_through(self, vllm_endpoint):
        """Each request straight to the vLLM engine: vLLM answers it (< 400) exactly when the
        gateway's request schema lets it through (serving/request_schema.py). Left out, as
        known differences: the gateway refuses, as OpenAI does, what vLLM's lax parsing
        takes (`max_tokens: "10"`, `n: true`, a tool message without its tool_call_id), and
        lets through what only an engine setting refuses (top_logprobs over --max-logprobs,
        more stop strings than VLLM_MAX_STOP_STRINGS)."""
        import httpx

        from lmstack.serving.openai_compat import RequestRejected, ServedModel, normalise

        gateway_root = vllm_endpoint["base_url"].removesuffix("/v1")
        engine_url = httpx.get(f"{gateway_root}/health").json()["upstream"]
        (model,) = [m["id"] for m in httpx.get(f"{engine_url}/models").json()["data"]]
        user = [{"role": "user", "content": QUESTION}]
        table = [
            {"temperature": -1},
            {"temperature": 2.5},
            {"temperature": 0.7},
            {"top_p": 0},
            {"top_p": 1},
            {"n": 0},
            {"messages": "hi"},
            {"messages": [{"content": QUESTION}]},  # no role
            {"messages": []},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]},
            {"messages": [{"role": "wizard", "content": QUESTION}]},  # a custom role
            {"stop": ["\n", "."]},
            {"tools": "x"},
            {"max_tokens": 0},
            {"stream_options": {"include_usage": True}},  # without stream
            {"logprobs": True, "top_logprobs": 2, "tools": None},
            {"top_k": 5, "ignore_eos": True, "min_tokens": 1},  # vLLM's own keys
        ]
        disagreements = []
        for fields in table:
            body = {"model": model, "messages": user, "max_tokens": 2} | fields
            answer = httpx.post(f"{engine_url}/chat/completions", json=body, timeout=120)
            try:
                normalise(body, "chat", ServedModel(name=model, engine="vllm"))
                passes = True
            except RequestRejected:
                passes = False
            if (answer.status_code < 400) != passes:
                disagreements.append((fields, answer.status_code, answer.text[:300], passes))
        assert not disagreements, disagreements


@NEEDS_ENGINES
def test_ab_of_two_adapters_on_one_vllm_engine_routes_each_variant_to_its_adapter(
    sft_run, tmp_path
):
    """Two LoRA runs of one base as variants A and B (serving.enable_lora): one vLLM engine
    serves both adapters, and each answer, by variant, is that run's own greedy answer."""
    import httpx

    from lmstack.models.loading import model_from_run

    require(VLLM_PYTHON)
    longer = run_dirs_of(*FAST, "trainer.max_steps=12", "seed=7", output_dir=tmp_path / "b")
    runs = {"A": sft_run, "B": longer}
    expected = {name: greedy_reply(model_from_run(run), QUESTION, 16) for name, run in runs.items()}
    assert expected["A"] != expected["B"], expected  # otherwise routing could not be seen
    variants = variants_override("model", sft_run, longer)
    process, endpoint = start_serve(
        sft_run, tmp_path / "out", "serving=vllm", "serving.enable_lora=true", variants,
        timeout_s=900,
    )  # fmt: skip
    answers: dict[str, set[str]] = {"A": set(), "B": set()}
    try:
        for user in (f"user-{n}" for n in range(12)):
            reply = httpx.post(
                f"{endpoint['base_url']}/chat/completions",
                json={
                    "model": "any",
                    "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 16,
                    "temperature": 0,
                },
                headers={"X-Lmstack-User": user},
                timeout=300,
            )
            assert reply.status_code == 200, reply.text
            content = reply.json()["choices"][0]["message"]["content"]
            answers[reply.headers["x-lmstack-variant"]].add(content)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    assert answers == {"A": {expected["A"]}, "B": {expected["B"]}}, (answers, expected)
    logs = list((tmp_path / "out").rglob("engine-vllm.log"))
    assert len(logs) == 1  # one engine for both variants
    first_line = logs[0].read_text().splitlines()[0]
    assert "--lora-modules" in first_line and "A=" in first_line and "B=" in first_line
    (variants_file,) = (tmp_path / "out").rglob("ab_variants.json")
    assert {entry["mode"] for entry in json.loads(variants_file.read_text())} == {"multi-LoRA"}
    assert_nothing_left()


def run_dirs_of(*args: str, output_dir: Path) -> Path:
    run_cli(*args, "logger=none", "trainer.num_threads=1", output_dir=output_dir)
    (run_dir,) = run_dirs(output_dir)
    return run_dir


@NEEDS_ENGINES
def test_vllm_serves_base_plus_adapter_without_merging(sft_run, tmp_path):
    require(VLLM_PYTHON)
    run = tmp_path / "run"
    shutil.copytree(sft_run, run, ignore=shutil.ignore_patterns("merged", "merge.lock", "gguf"))
    from lmstack.models.loading import model_from_run

    expected = greedy_reply(model_from_run(sft_run), QUESTION, 16)  # the merged model's answer
    process, endpoint = start_serve(
        run, tmp_path / "out", "serving=vllm", "serving.enable_lora=true", "serving.gateway=false",
        timeout_s=900,
    )  # fmt: skip
    try:
        from openai import OpenAI

        client = OpenAI(base_url=endpoint["base_url"], api_key="EMPTY")
        reply = client.chat.completions.create(
            model=endpoint["model"],
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=16,
            temperature=0,
        )
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    assert reply.choices[0].message.content == expected
    assert not (run / "merged").exists(), "enable_lora merged the adapter"
    (log,) = (tmp_path / "out").rglob("engine-vllm.log")
    assert "--enable-lora" in log.read_text().splitlines()[0]
    assert_nothing_left()


# ---- llama.cpp on a GGUF export ----


@NEEDS_ENGINES
def test_llamacpp_serves_the_f16_gguf_with_the_runs_greedy_answers(sft_run, tmp_path):
    require(LLAMA_SERVER)
    llamacpp = ("serving=llamacpp", f"serving.model={sft_run}")
    local, served = local_and_served_answers(sft_run, tmp_path, *llamacpp)
    assert len(local) == 12 and served == local
    # the CPU backend the portable build picked for this machine, named
    picked = re.search(
        r"llama.cpp runs its CPU kernels for (\S+)", (tmp_path / "served.out").read_text()
    )
    assert picked and picked[1] == llamacpp_level(), picked  # the one level compiled here
    assert list(CACHE_DIR.glob("gguf/*/model-f16.gguf")) and not (sft_run / "gguf").exists()
    assert_nothing_left()


@NEEDS_ENGINES
def test_q4_gguf_agrees_with_the_run_on_most_answers(sft_run, tmp_path):
    """q4_k_m rounds the weights: at least 9 of 12 greedy answers stay the same."""
    require(LLAMA_SERVER)
    q4_k_m = ("serving=llamacpp", f"serving.model={sft_run}", "serving.quantization=q4_k_m")
    local, q4 = local_and_served_answers(sft_run, tmp_path, *q4_k_m)
    agree = sum(a == b for a, b in zip(local, q4, strict=True))
    assert agree >= 9, (agree, local, q4)
    (described,) = [
        json.loads(p.read_text())["eval/described"]
        for p in (tmp_path / "served").rglob("metrics.json")
    ]
    q4_file = Path(described["gguf"])
    assert q4_file.name == "model-q4_k_m.gguf"
    assert q4_file.stat().st_size < (q4_file.parent / "model-f16.gguf").stat().st_size


@NEEDS_ENGINES
def test_gguf_export_at_training_loads_in_transformers(tmp_path):
    require(LLAMA_SERVER)
    run_cli(*FAST, "logger=none", "trainer.num_threads=1", "export.gguf=f16", output_dir=tmp_path)
    (run,) = run_dirs(tmp_path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = run / "gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf, gguf_file="model-f16.gguf")
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    ids = tokenizer("Ann has 3 apples", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(ids).logits, merged(ids).logits
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.allclose(got, want, atol=0.05)  # f16 weights


@NEEDS_ENGINES
def test_bad_gguf_export_type_and_unknown_architecture(tmp_path, tiny_base):
    result = run_cli(*FAST, "logger=none", "export.gguf=q3", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "export.gguf: 'q3' is not one of f16, q8_0, q4_k_m")
    require(LLAMA_SERVER)
    odd = tmp_path / "odd-model"
    shutil.copytree(tiny_base, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    result = run_cli(
        *BENCH, "serving=llamacpp", f"serving.model={odd}", output_dir=tmp_path, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "export.gguf: llama.cpp's converter does not know the architecture" in result.stderr
    assert "NoSuchModelForCausalLM" in result.stderr
    assert_nothing_left()


# ---- the engines side by side ----


@NEEDS_ENGINES
def test_bench_across_three_engines_ends_in_one_summary(sft_run, tmp_path):
    require(VLLM_PYTHON)
    require(LLAMA_SERVER)
    run_cli(
        "-m", *BENCH, "serving=hf,vllm,llamacpp", f"serving.model={sft_run}",
        "serving.gateway=false", output_dir=tmp_path,
    )  # fmt: skip
    points = run_dirs(tmp_path)
    engines = sorted(json.loads((p / "metrics.json").read_text())["bench/engine"] for p in points)
    assert engines == ["hf", "llamacpp", "vllm"]
    (summary,) = (tmp_path / "sweeps").rglob("summary.md")
    assert summary.read_text().count("| finished |") == 3 or "finished" in summary.read_text()
    assert list(summary.parent.glob("*.png"))
    assert_nothing_left()


# ---- vLLM rollouts for GRPO and PPO ----


def greedy_gap(model, batch: dict, completions, eos_token_id: int) -> float:
    """How far the completions are from the model's own greedy choices: the largest gap, over
    every kept token, between the best log-prob and the chosen token's (0: all greedy)."""
    import torch

    from lmstack.objectives.rollout import completion_mask

    mask = completion_mask(completions, eos_token_id)
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    input_ids = torch.cat([prompt_ids, completions], dim=1)
    attention = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    logps = logits[:, prompt_ids.shape[1] - 1 : -1].log_softmax(-1)
    chosen = logps.gather(-1, completions[..., None]).squeeze(-1)
    return float(((logps.max(-1).values - chosen) * mask).max())


@NEEDS_ENGINES
def test_vllm_rollout_engine_follows_the_policys_weights(tmp_path):
    """After an update the engine's greedy answers are the policy's own greedy choices (up to
    near-ties between two kernels: every chosen token within 0.05 nats of the policy's best);
    the answers it gave before the update are not (so the update reached its weights)."""
    require(VLLM_PYTHON)
    import torch
    from test_config import compose_config

    from lmstack.data import arith
    from lmstack.data.prompts import PromptCollator, encode_prompts
    from lmstack.launch import validate
    from lmstack.models.loading import load_for_training
    from lmstack.serving.rollouts import vllm_rollouts

    config = validate(compose_config("objective=grpo", "objective.rollout_engine=vllm"))
    loaded = load_for_training(config, str(CACHE_DIR))
    tokenizer, model = loaded.tokenizer, loaded.model
    model.eval()
    eos = tokenizer.eos_token_id
    rows = [{"prompt": p.question} for p in arith.problems(6, seed=0, held_out=True)]
    batch = PromptCollator(tokenizer.pad_token_id)(encode_prompts(rows, tokenizer, 200, "test"))

    with vllm_rollouts(config, loaded, str(CACHE_DIR), tmp_path) as engine:
        assert greedy_gap(model, batch, engine.sample(batch, 1, 12, greedy=True), eos) < 0.05
        torch.manual_seed(0)
        with torch.no_grad():  # a policy update that changes the answers
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.add_(torch.randn_like(weight) * 0.5)
        before = engine.sample(batch, 1, 12, greedy=True)
        engine.update(model)
        after = engine.sample(batch, 1, 12, greedy=True)
        assert greedy_gap(model, batch, after, eos) < 0.05
        assert greedy_gap(model, batch, before, eos) > 0.5
        assert engine.name == "policy-1"
        assert not (tmp_path / "rollout-adapters" / "policy-0").exists()
        sampled = engine.sample(batch, 4, 12, temperature=1.0)
        assert sampled.shape == (6 * 4, 12)
    assert not (tmp_path / "rollout-adapters").exists()
    assert_nothing_left()


@NEEDS_ENGINES
@pytest.mark.slow
def test_grpo_with_vllm_rollouts_moves_the_verifier_score(tmp_path):
    """tests/test_grpo.py's learning test with rollouts on vLLM: from a 20-step SFT run, 60
    GRPO updates (8 prompts x 8 samples at temperature 0.7) lift the greedy held-out verifier
    score by at least 0.2, as in-process rollouts do."""
    require(VLLM_PYTHON)
    quiet = ("logger=none", "trainer.enable_progress_bar=false")
    run_cli("trainer.max_steps=20", "trainer.checkpoint_every_n_steps=10", *quiet,
            output_dir=tmp_path / "sft")  # fmt: skip
    (sft_run,) = run_dirs(tmp_path / "sft")
    run_cli(
        "objective=grpo", f"model.init_from={sft_run}", "objective.rollout_engine=vllm",
        "objective.temperature=0.7", "objective.group_size=8", "trainer.max_steps=60",
        "data.batch_size=8", *quiet, output_dir=tmp_path / "grpo", timeout=3000,
    )  # fmt: skip
    (grpo_run,) = run_dirs(tmp_path / "grpo")
    metrics = json.loads((grpo_run / "metrics.json").read_text())
    assert metrics["verify/score_after"] >= metrics["verify/score_before"] + 0.2, metrics
    assert metrics["train/rollout_tokens_per_s"] > 0
    assert_nothing_left()
