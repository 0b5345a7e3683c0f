"""Shared helpers of the side-by-side benchmarks (not tests; see docs/benchmarks.md).

Each side of a comparison runs in its own child process, so its peak memory
(the child's maximum RSS, read with `os.wait4`) holds only what that side loaded.
Sides run interleaved (A, B, A, B, ...) and each figure is the median of the
repeats, because the machine's cores are shared and its load drifts.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "lmstack"
PYTHON = sys.executable
sys.path.insert(0, str(ROOT / "src"))

# A Llama of ~21M parameters: large enough that matmuls dominate a step on a CPU.
BENCH_SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_layers": 6,
    "num_heads": 8,
    "num_kv_heads": 8,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
}


def build_model(shape: dict[str, int] | None = None) -> Path:
    """A random Llama with lmstack's built-in tokenizer, as a Hugging Face folder (cached)."""
    from lmstack.config.groups.model import TinyLlamaConfig
    from lmstack.models.builtin import ensure_builtin_model

    return ensure_builtin_model(TinyLlamaConfig(**(shape or BENCH_SHAPE)), False, CACHE)


def parameter_count(folder: Path) -> int:
    """Parameters of a Llama folder, from its config (tied embeddings counted once)."""
    config = json.loads((folder / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return config["num_hidden_layers"] * per_layer + embeddings + hidden


# ---------------------------------------------------------------- data


def _text_of_tokens(tokenizer: Any, words: list[str], rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of task-like text (sentences of the built-in arithmetic task)."""
    out: list[str] = []
    count = 0
    while count < tokens:
        word = rng.choice(words)
        out.append(word)
        count += len(tokenizer.encode(" " + word, add_special_tokens=False))
    return " ".join(out)


def lognormal_lengths(
    rng: random.Random, count: int, median: int, sigma: float, low: int, high: int
):
    return [min(high, max(low, int(median * math.exp(rng.gauss(0, sigma))))) for _ in range(count)]


@dataclass(frozen=True)
class DataCase:
    """Rows whose prompt and completion lengths (in tokens) are log-normal around a median."""

    name: str
    prompt_median: int
    completion_median: int
    sigma: float
    max_length: int


DATA_CASES = {
    # chat-like rows with a moderate spread (like instruction-tuning sets)
    "chat": DataCase("chat", prompt_median=40, completion_median=80, sigma=0.5, max_length=512),
    # a wide spread: a few long rows among many short ones
    "mixed": DataCase("mixed", prompt_median=24, completion_median=48, sigma=1.1, max_length=512),
}


def _vocabulary() -> list[str]:
    from lmstack.data.arith import pretraining_corpus

    return sorted({w for text in pretraining_corpus(400, seed=7) for w in text.split()})


def write_rows(case: DataCase, count: int, kind: str, tokenizer: Any, seed: int = 0) -> Path:
    """`count` rows of `kind` ("sft": prompt/completion, "dpo": prompt/chosen/rejected)
    as a jsonl file under benchmarks/results/data (reused when it exists)."""
    path = RESULTS / "data" / f"{kind}-{case.name}-{count}-{seed}.jsonl"
    if path.exists():
        return path
    rng, words = random.Random(f"{case.name}-{seed}"), _vocabulary()
    prompts = lognormal_lengths(rng, count, case.prompt_median, case.sigma, 4, case.max_length // 2)
    answers = lognormal_lengths(
        rng, count, case.completion_median, case.sigma, 4, case.max_length // 2
    )
    rows = []
    for prompt_len, answer_len in zip(prompts, answers):
        row = {"prompt": _text_of_tokens(tokenizer, words, rng, prompt_len)}
        if kind == "sft":
            row["completion"] = _text_of_tokens(tokenizer, words, rng, answer_len)
        else:
            row["chosen"] = _text_of_tokens(tokenizer, words, rng, answer_len)
            row["rejected"] = _text_of_tokens(
                tokenizer, words, rng, max(4, int(answer_len * math.exp(rng.gauss(0, 0.3))))
            )
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def conversational(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The same rows in TRL's conversational form, so its chat template renders them."""
    out = []
    for row in rows:
        item: dict[str, Any] = {"prompt": [{"role": "user", "content": row["prompt"]}]}
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                item[key] = [{"role": "assistant", "content": row[key]}]
        out.append(item)
    return out


def lmstack_token_count(rows: list[dict[str, str]], tokenizer: Any, max_length: int) -> int:
    """Real tokens lmstack trains on: each (truncated) sequence, both sides of a pair."""
    from lmstack.data.tokenize import encode_prompt_completion

    total = 0
    for row in rows:
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                encoded = encode_prompt_completion(row["prompt"], row[key], tokenizer, max_length)
                total += len(encoded["input_ids"])
    return total


# ---------------------------------------------------------------- running sides


def thread_env(threads: int) -> dict[str, str]:
    """The same thread count for every math library on every side."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["WANDB_MODE"] = "disabled"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class ChildResult:
    returncode: int
    output: str
    wall_s: float
    peak_rss_mb: float


def run_child(command: list[str], threads: int, timeout: float = 1800) -> ChildResult:
    """Run `command` to the end; its peak RSS comes from the kernel's accounting of that
    one child (os.wait4), so no sampling misses a short peak."""
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=thread_env(threads), stdout=log, stderr=subprocess.STDOUT
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    # ru_maxrss is in KiB on Linux
    return ChildResult(
        proc.returncode, output, time.perf_counter() - started, usage.ru_maxrss / 1024
    )


def result_line(output: str, marker: str = "BENCH_RESULT ") -> dict[str, Any]:
    """The JSON a child prints on a line starting with `marker`."""
    for line in reversed(output.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker) :])
    raise RuntimeError(f"no {marker.strip()} line in the child's output:\n{output[-3000:]}")


def load_average() -> float:
    return os.getloadavg()[0]


@dataclass
class Side:
    """One side of a comparison: `run()` returns its figures (a dict of numbers)."""

    name: str
    run: Callable[[], dict[str, float]]
    samples: list[dict[str, float]] = field(default_factory=list)


def interleaved(
    sides: list[Side], repeats: int, verbose: bool = True, alternate: bool = False
) -> None:
    """A, B, A, B, ...: drift in the machine's load hits every side alike (``alternate``:
    A, B, B, A, ..., for a drift that is steady within a repeat)."""
    for repeat in range(repeats):
        for side in sides[::-1] if alternate and repeat % 2 else sides:
            load = load_average()
            figures = side.run()
            figures["load_1min"] = load
            side.samples.append(figures)
            if verbose:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in figures.items() if _is_number(v))
                print(f"  [{repeat + 1}/{repeats}] {side.name}: {shown}", flush=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def medians(side: Side) -> dict[str, float]:
    keys = [k for k in side.samples[0] if _is_number(side.samples[0][k])]
    return {k: statistics.median(s[k] for s in side.samples) for k in keys}


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain-text table; floats to 3 significant figures."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    table = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_results(name: str, payload: dict[str, Any], model: str = "random") -> Path:
    """benchmarks/results/<name>.json, or <name>-<model>.json for a real --model."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}.json" if model == "random" else f"{name}-{model}.json")
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path


def machine() -> dict[str, Any]:
    import platform

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def run_lmstack(overrides: list[str], threads: int) -> tuple[dict[str, Any], ChildResult]:
    """`python run.py <overrides>` in a fresh output folder: (its metrics.json, the child)."""
    import glob

    with tempfile.TemporaryDirectory() as out:
        command = [
            PYTHON,
            "run.py",
            *overrides,
            f"trainer.num_threads={threads}",
            "trainer.enable_progress_bar=false",
            "logger=none",
            f"paths.output_dir={out}",
            f"paths.ref_logps_dir={out}/ref_logps",
        ]
        child = run_child(command, threads)
        found = glob.glob(f"{out}/runs/*/metrics.json")
        if child.returncode != 0 or not found:
            raise RuntimeError(f"lmstack failed:\n{child.output[-3000:]}")
        return json.loads(Path(found[0]).read_text()), child


def child_side(script: str, variant: str, options: list[str], threads: int):
    """A side that runs `script --child variant <options>`, which prints BENCH_RESULT
    {"tokens", "train_s"}; adds tokens/s and the child's peak RSS."""

    def run() -> dict[str, float]:
        command = [PYTHON, script, "--child", variant, "--threads", str(threads), *options]
        child = run_child(command, threads)
        if child.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{child.output[-3000:]}")
        figures = result_line(child.output)
        figures["tokens_per_s"] = figures["tokens"] / figures["train_s"]
        figures["peak_rss_mb"] = child.peak_rss_mb
        return figures

    return run


def comparison_rows(case: str, medians: dict[str, dict[str, float]], params: int, peak: float):
    """Table rows: each side's medians and, on each peer's row, the lmstack sides' ratios to
    it (speed-up in tokens/s; RSS ratio, below 1 = lmstack uses less memory)."""
    from hardware import mfu

    ours = {name: m for name, m in medians.items() if name.startswith("lmstack")}
    rows = []
    for side_name, figures in medians.items():
        figures["mfu"] = mfu(params, figures["tokens_per_s"], peak)
        row = {
            "case": case,
            "side": side_name,
            "tokens/s": figures["tokens_per_s"],
            "train s": figures["train_s"],
            "peak RSS MB": figures["peak_rss_mb"],
            "MFU": f"{100 * figures['mfu']:.1f}%",
            "load": figures["load_1min"],
        }
        if side_name not in ours:
            for name, mine in ours.items():
                label = name.split(" ")[-1] if name.endswith("ckpt") else "lmstack"
                row[f"{label} speed-up"] = mine["tokens_per_s"] / figures["tokens_per_s"]
                row[f"{label} RSS ratio"] = mine["peak_rss_mb"] / figures["peak_rss_mb"]
        rows.append(row)
    return rows


TABLE_COLUMNS = [
    "case",
    "side",
    "tokens/s",
    "train s",
    "peak RSS MB",
    "MFU",
    "lmstack speed-up",
    "lmstack RSS ratio",
    "+ckpt speed-up",
    "+ckpt RSS ratio",
    "-ckpt speed-up",
    "-ckpt RSS ratio",
    "load",
]


# ---- what the LoRA training comparisons (sft.py, dpo.py) share ----------------------------

# each side's setting for one precision: (lmstack trainer.precision, TRL bf16)
PRECISIONS = {"fp32": ("32-true", False), "bf16": ("bf16-mixed", True)}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_training_arguments(parser: Any) -> None:
    """Options of every lmstack-vs-TRL training comparison, and the child process's own."""
    import argparse

    parser.add_argument(
        "--repeats", type=int, help="interleaved repeats (default: 3; 2 on a real model)"
    )
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run lmstack with trainer.gradient_checkpointing forced (SFT: on and off, "
        "its default being the memory plan's choice; DPO: off, its default being on)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="the same on every side: fp32 (lmstack trainer.precision=32-true, TRL bf16=False) "
        "or bf16 (bf16-mixed; TRL bf16=True, its default and a speed option)",
    )
    add_model_arguments(parser)
    parser.add_argument("--peak-gflops", type=float, default=0.0, help="0: measure it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)


REAL_MODELS = ("smollm2_135m",)


def short_on_a_real_model(args: Any, rows: int, real_rows: int) -> None:
    """Defaults for --rows and --repeats: a real model's run stays a few minutes (4 steps,
    2 repeats); the random model keeps its longer run."""
    real = args.model in REAL_MODELS
    if args.rows is None:
        args.rows = real_rows if real else rows
    if args.repeats is None:
        args.repeats = 2 if real else 3


def add_model_arguments(parser: Any) -> None:
    """--model (random or the real model) and --threads (default: 1 on the random model,
    all cores on the real one, as its users run it); a child gets the model's folder."""
    parser.add_argument(
        "--model",
        default="random",
        help="random (a random Llama with lmstack's 512-token tokenizer) or smollm2_135m "
        "(SmolLM2-135M-Instruct, 49k vocabulary; `make smollm2`)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, on every side "
        "(default: 1 on the random model, all cores on a real one)",
    )


def model_folder(args: Any, shape: dict[str, int] | None = None) -> Path:
    """The folder --model names (the real one converted from its wheel's GGUF on first use);
    fills in --threads' default for it."""
    if args.model in REAL_MODELS:
        from lmstack.models.from_gguf import SMOLLM2_135M, ensure_gguf_model

        folder = ensure_gguf_model(SMOLLM2_135M, CACHE)
    elif args.model == "random":
        folder = build_model(shape)
    else:
        raise SystemExit(f"--model: '{args.model}' is not one of random, {', '.join(REAL_MODELS)}")
    if args.threads is None:
        args.threads = os.cpu_count() if args.model in REAL_MODELS else 1
    return folder


def comparison_model(args: Any) -> tuple[Path, int, Any, float]:
    """The benchmark model (built once, cached), its size, tokenizer and the matmul peak."""
    from hardware import matmul_gflops
    from transformers import AutoTokenizer

    model = model_folder(args)
    params = parameter_count(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    peak = args.peak_gflops or matmul_gflops(args.threads)
    print(f"model: {params / 1e6:.1f}M parameters ({model.name}); matmul peak {peak:.1f} GFLOP/s")
    return model, params, tokenizer, peak


def lmstack_lora_side(
    overrides: list[str], model: Path, data: Path, args: Any, case: DataCase, tokens: int
) -> Callable[[], dict[str, float]]:
    """lmstack's own command line with the shared LoRA settings plus `overrides`;
    train/seconds is its Lightning fit time."""
    overrides = [
        *overrides,
        "model=hf",
        f"model.name_or_path={model}",
        "data=jsonl",
        f"data.path={data}",
        "data.eval_fraction=0",
        f"data.batch_size={args.batch_size}",
        f"data.max_length={case.max_length}",
        f"trainer.max_steps={args.rows // args.batch_size}",
        f"adapter.r={LORA['r']}",
        f"adapter.alpha={LORA['alpha']}",
        f"adapter.dropout={LORA['dropout']}",
        "verify.enabled=false",
        f"trainer.precision={PRECISIONS[args.precision][0]}",
    ]

    def run() -> dict[str, float]:
        metrics, child = run_lmstack(overrides, args.threads)
        seconds = metrics["train/seconds"]
        return {
            "tokens": tokens,
            "train_s": seconds,
            "tokens_per_s": tokens / seconds,
            "peak_rss_mb": child.peak_rss_mb,
        }

    return run


def checkpointing_override(checkpointing: bool | None) -> list[str]:
    """No override (lmstack's default for the objective), or trainer.gradient_checkpointing."""
    if checkpointing is None:
        return []
    return [f"trainer.gradient_checkpointing={str(checkpointing).lower()}"]


def trl_lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )


def trl_training_options(args: Any) -> dict[str, Any]:
    """TRL config fields both comparisons set: the shared settings, nothing else."""
    return {
        "per_device_train_batch_size": args.batch_size,
        "num_train_epochs": 1,
        "bf16": PRECISIONS[args.precision][1],  # the same precision on every side
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
    }


def case_record(args: Any, case: DataCase, tokens: int, sides: list[Side]) -> dict[str, Any]:
    """What results JSON keeps of one data case: sizes, medians and every sample."""
    return {
        "rows": args.rows,
        "tokens": tokens,
        "max_length": case.max_length,
        "medians": {side.name: medians(side) for side in sides},
        "samples": {side.name: side.samples for side in sides},
    }


def comparison_cases(
    args: Any, kind: str, tokenizer: Any
) -> Iterator[tuple[str, DataCase, Path, int]]:
    """Each of --cases: its name, its shape, the rows written for `kind` (sft or dpo) and
    their token count as lmstack trains on them."""
    for name in args.cases.split(","):
        case = DATA_CASES[name]
        data = write_rows(case, args.rows, kind, tokenizer)
        yield name, case, data, lmstack_token_count(read_rows(data), tokenizer, case.max_length)


def report_comparison(
    kind: str, title: str, args: Any, params: int, peak: float, table: list, cases: dict, **sizes
) -> None:
    """A comparison's table on the console and its results JSON (`sizes`: its batch size)."""
    print_table(f"{title}, median of {args.repeats} (threads={args.threads})", table, TABLE_COLUMNS)
    payload = {
        "params": params,
        **sizes,
        "threads": args.threads,
        "peak_gflops": peak,
        "lora": LORA,
        "versions": versions("torch", "transformers", "trl", "peft", "lightning"),
        "table": table,
        "cases": cases,
    }
    # a bf16 run goes beside the float32 one, not over it
    name = kind if args.precision == "fp32" else f"{kind}-{args.precision}"
    write_results(name, payload, args.model)


def trl_dataset(args: Any) -> Any:
    """A TRL child's rows (--data) as a datasets.Dataset of conversations, with torch on
    --threads first (before transformers and TRL load)."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset

    return Dataset.from_list(conversational(read_rows(Path(args.data))))


def train_trl(
    trainer_class: Any,
    make_config: Callable[[str], Any],
    rows: Any,
    args: Any,
    count: float,
    tokenizer_options: dict[str, Any] | None = None,
    **trainer_options: Any,
) -> None:
    """One TRL child run: `trainer_class` on `rows` with `make_config(output_dir)`, the shared
    LoRA settings and the model's tokenizer; prints the BENCH_RESULT line its parent reads
    (`count`: the tokens, or updates, the time is divided into)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_class(
            model=args.model,
            args=make_config(out),
            train_dataset=rows,
            processing_class=AutoTokenizer.from_pretrained(args.model, **(tokenizer_options or {})),
            peft_config=trl_lora_config(),
            **trainer_options,
        )
        result = trainer.train()
    figures = {"tokens": count, "train_s": result.metrics["train_runtime"]}
    print("BENCH_RESULT " + json.dumps(figures), flush=True)
