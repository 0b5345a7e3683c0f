"""serving=hf: transformers' own OpenAI-compatible server (`transformers serve`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lmstack.serving.engine_api import Engine, Launch, Target

BNB_QUANTIZATIONS = {"int8": "bnb-8bit", "nf4": "bnb-4bit", "q4": "bnb-4bit"}


class HfEngine(Engine):
    name = "hf"

    def launch(
        self, serving: Any, target: Target, executable: str, device: str, port: int, scratch: Path
    ) -> Launch:
        threads = engine_threads(serving.num_threads)
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        # the env prefix shows the thread count in the logged command line
        command = [f"{key}={value}" for key, value in env.items()]
        command = ["env", *command] if command else []
        path = sampling_view(target.path, scratch) if serving.continuous_batching else target.path
        command += [*transformers_cli(executable), "serve", path, "--host", serving.host]
        command += ["--port", str(port), "--device", "auto"]
        command.append(
            "--continuous-batching" if serving.continuous_batching else "--no-continuous-batching"
        )
        if serving.continuous_batching and serving.cb_num_blocks:
            command += ["--cb-num-blocks", str(serving.cb_num_blocks)]
        if serving.continuous_batching and serving.cb_max_batch_tokens:
            command += ["--cb-max-batch-tokens", str(serving.cb_max_batch_tokens)]
        if serving.quantization != "none":
            command += ["--quantization", BNB_QUANTIZATIONS[serving.quantization]]
        # transformers serve pins the model name to its path
        return Launch(command + list(serving.extra_args), path)


# the temperature a sampling view's config names: only a default for the batching manager's
# per-request temperature (the gateway sends every request's own, 0 where it gives none)
VIEW_TEMPERATURE = 0.7


def sampling_view(path: str, scratch: Path) -> str:
    """The model folder as continuous batching must see it to honour a request's temperature.

    transformers serve's batching manager fixes, when it starts, whether it samples (the
    model's generation config's do_sample) and which per-request processors exist: none for a
    temperature left unset or at 1.0, none for an unset top_k (so a greedy request, top_k 1,
    would sample). A model whose config does not sample (lmstack's own, a GGUF conversion,
    many checkpoints) would answer temperature 1.0 greedily, every repeat of a prompt alike.
    The engine then serves a view of the folder: links to its files, and a generation config
    that samples, with a temperature and a top_k of the whole vocabulary (which keeps every
    token: it only gives greedy requests their processor). The gateway keeps the model's
    greedy default for requests that name no temperature."""
    folder = Path(path)
    config_path = folder / "generation_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return path  # no readable config (a hub name, say): served as it is
    sampling = sampling_settings(config, vocabulary_size(folder))
    if all(config.get(key) == value for key, value in sampling.items()):
        return path
    view = scratch / "model"
    view.mkdir()
    for entry in folder.iterdir():
        if entry.name != config_path.name:
            (view / entry.name).symlink_to(entry.resolve())
    (view / config_path.name).write_text(json.dumps(config | sampling, indent=2))
    return str(view)


def sampling_settings(config: dict[str, Any], vocabulary: int) -> dict[str, Any]:
    temperature = config.get("temperature")
    top_k = config.get("top_k")
    return {
        "do_sample": True,
        "temperature": VIEW_TEMPERATURE if temperature in (None, 1.0) else temperature,
        "top_k": top_k if top_k else vocabulary,
    }


def vocabulary_size(folder: Path) -> int:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else 50


def engine_threads(num_threads: int) -> int | None:
    """serving.num_threads as a count; None leaves torch's default."""
    if num_threads >= 0:
        return num_threads or None
    return max(1, len(os.sched_getaffinity(0)) - 1)  # the cores this job may use, but one


def transformers_cli(executable: str) -> list[str]:
    """The `transformers` command of the engine's Python environment."""
    script = Path(executable).parent / "transformers"
    if script.is_file():
        return [str(script)]
    code = "import sys; from transformers.cli.transformers import main; sys.exit(main())"
    return [executable or sys.executable, "-c", code]
