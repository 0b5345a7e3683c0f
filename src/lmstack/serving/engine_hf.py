"""serving=hf: transformers' own OpenAI-compatible server (`transformers serve`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar

from lmstack.serving.engine_api import Engine, Launch, Target

BNB_QUANTIZATIONS = {"int8": "bnb-8bit", "nf4": "bnb-4bit", "q4": "bnb-4bit"}


class HfEngine(Engine):
    name = "hf"
    quantizations: ClassVar[dict[str, tuple[str, ...]]] = {
        "cpu": ("none", "int8", "nf4", "q4"),
        "cuda": ("none", "int8", "nf4", "q4"),
    }

    def launch(
        self, serving: Any, target: Target, executable: str, device: str, port: int, scratch: Path
    ) -> Launch:
        threads = engine_threads(serving.num_threads)
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        # the env prefix shows the thread count in the logged command line
        command = [f"{key}={value}" for key, value in env.items()]
        command = ["env", *command] if command else []
        command += [*transformers_cli(executable), "serve", target.path, "--host", serving.host]
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
        return Launch(command + list(serving.extra_args), target.path)


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
