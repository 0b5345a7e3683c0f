"""phase=serve: a model, a run or an adapter behind an OpenAI-compatible URL until Ctrl-C.

Reads top to bottom: resolve what to serve (a run directory becomes its merged
model, with the run's tokenizer and chat template) → start the engine (and the
tracing gateway) → print the URL and a curl example → wait → stop everything.

Deferred imports, for start-up time: openai (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

from lmstack.phases.context import RunContext
from lmstack.tracking.run_dir import write_json

ENGINE_CHECK_S = 1.0  # how often the engine process is looked at (serving.on_engine_exit)


def run(ctx: RunContext) -> dict[str, Any]:
    from lmstack.serving.engines import serve

    with serve(ctx.config, ctx.cache_dir, ctx.run_dir) as endpoint:
        write_json(ctx.run_dir / "endpoint.json", endpoint.public())
        print(usage(endpoint), flush=True)
        try:
            while True:
                time.sleep(ENGINE_CHECK_S)
                if endpoint.watch is not None:  # an engine lmstack started (not external)
                    endpoint.watch.check()
        except KeyboardInterrupt:
            # the task wrapper records the run as interrupted, naming the signal
            print("lmstack: stopping the server", flush=True)
            raise


def usage(endpoint: Any) -> str:
    body = {
        "model": endpoint.model,
        "messages": [{"role": "user", "content": "Ann has 3 apples and gets 4 more. How many?"}],
        "max_tokens": 32,
    }
    curl = (
        f"curl {endpoint.base_url}/chat/completions -H 'Content-Type: application/json' "
        f"-d {shlex.quote(json.dumps(body))}"
    )
    return (
        f"lmstack: serving {endpoint.model}\n"
        f"  URL:   {endpoint.base_url}   (OpenAI-compatible; model name below)\n"
        f"  model: {endpoint.model}\n"
        f"  try:   {curl}\n"
        "  stop:  Ctrl-C"
    )
