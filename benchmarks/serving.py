"""Serving: `serving=hf` at concurrency 16 against one request at a time (through
`python run.py phase=bench`, as users run it), and lmstack's load client against a second
client (the openai package's AsyncOpenAI, streaming) on the same server, to show the
client is not the bottleneck.

    .venv/bin/python benchmarks/serving.py
    .venv/bin/python benchmarks/serving.py --requests 16 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def bench_side(concurrency: int, args):
    """`python run.py phase=bench` at one concurrency (its own server, started and stopped)."""
    overrides = [
        "phase=bench",
        "serving=hf",
        f"bench.max_concurrency={concurrency}",
        f"bench.num_requests={args.requests}",
        f"bench.max_tokens={args.max_tokens}",
    ]

    def run() -> dict[str, float]:
        metrics, _ = common.run_lmstack(overrides, args.threads)
        return {
            "output_tok_per_s": metrics["bench/output_throughput"],
            "requests_per_s": metrics["bench/request_throughput"],
            "ttft_ms_p50": metrics["bench/ttft_ms_p50"],
            "e2el_ms_p50": metrics["bench/e2el_ms_p50"],
            "failed": metrics["bench/failed"],
        }

    return run


def compose_config(args):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lmstack.config.store import register_configs

    register_configs()
    overrides = ["phase=bench", "serving=hf", "logger=none", f"bench.max_tokens={args.max_tokens}"]
    with initialize_config_dir(str(common.ROOT / "conf"), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def lmstack_client(requests, endpoint, settings):
    from lmstack.serving.client import run_load

    def run() -> dict[str, float]:
        results, duration = asyncio.run(run_load(requests, endpoint, settings))
        done = [r for r in results if r.ok]
        return {
            "output_tok_per_s": sum(r.output_tokens for r in done) / duration,
            "requests_per_s": len(done) / duration,
            "failed": len(results) - len(done),
        }

    return run


def openai_client(requests, endpoint, settings):
    """The openai package, streaming, with the same bodies and the same concurrency cap."""
    from openai import AsyncOpenAI

    from lmstack.serving.client import ignore_eos_fields

    extra = ignore_eos_fields(endpoint.engine, settings) if settings.ignore_eos else {}

    async def load() -> tuple[int, int, float]:
        client = AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0)
        semaphore = asyncio.Semaphore(settings.max_concurrency or len(requests))

        async def one(request) -> int:
            async with semaphore:
                stream = await client.chat.completions.create(
                    model=endpoint.model,
                    messages=request["messages"],
                    max_tokens=settings.max_tokens,
                    temperature=settings.temperature,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=extra,
                )
                tokens = 0
                async for chunk in stream:
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                return tokens

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
        duration = time.perf_counter() - start
        await client.close()
        ok = [c for c in counts if isinstance(c, int)]
        return sum(ok), len(counts) - len(ok), duration

    def run() -> dict[str, float]:
        tokens, failed, duration = asyncio.run(load())
        return {
            "output_tok_per_s": tokens / duration,
            "requests_per_s": (len(requests) - failed) / duration,
            "failed": failed,
        }

    return run


def client_comparison(args) -> tuple[list[dict], dict]:
    import os
    from dataclasses import replace

    from lmstack.phases.bench import build_requests, load_settings
    from lmstack.prompts import prompt_version
    from lmstack.serving.engines import serve

    os.environ.update(common.thread_env(args.threads))  # the engine inherits the thread pin
    config = compose_config(args)
    requests = build_requests(config.bench, config.prompt)[: args.requests]
    settings = replace(
        load_settings(config.bench, prompt_version(config.prompt)),
        max_concurrency=args.client_concurrency,
    )
    with (
        tempfile.TemporaryDirectory() as logs,
        serve(config, str(common.CACHE), Path(logs), gateway=False) as endpoint,
    ):
        lmstack_client(requests[:4], endpoint, settings)()  # warm the engine
        sides = [
            common.Side("lmstack client", lmstack_client(requests, endpoint, settings)),
            common.Side("openai client", openai_client(requests, endpoint, settings)),
        ]
        # the engine slows down over successive loads: alternate which client goes first
        common.interleaved(sides, args.repeats, alternate=True)
    medians = {s.name: common.medians(s) for s in sides}
    rows = [
        {
            "client": name,
            "output tok/s": m["output_tok_per_s"],
            "requests/s": m["requests_per_s"],
            "failed": m["failed"],
            "vs openai client": m["output_tok_per_s"]
            / medians["openai client"]["output_tok_per_s"],
            "load": m["load_1min"],
        }
        for name, m in medians.items()
    ]
    return rows, {"medians": medians, "samples": {s.name: s.samples for s in sides}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client-concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()

    sides = [common.Side(f"c={c}", bench_side(c, args)) for c in (1, args.concurrency)]
    common.interleaved(sides, args.repeats)
    medians = {s.name: common.medians(s) for s in sides}
    single = medians["c=1"]
    rows = [
        {
            "concurrency": name,
            "output tok/s": m["output_tok_per_s"],
            "requests/s": m["requests_per_s"],
            "ttft ms p50": m["ttft_ms_p50"],
            "latency ms p50": m["e2el_ms_p50"],
            "throughput vs c=1": m["output_tok_per_s"] / single["output_tok_per_s"],
            "load": m["load_1min"],
        }
        for name, m in medians.items()
    ]
    common.print_table(
        f"serving=hf, {args.requests} requests x {args.max_tokens} tokens, median of "
        f"{args.repeats}",
        rows,
        list(rows[0]),
    )
    client_rows, client_payload = client_comparison(args)
    common.print_table(
        f"load clients on one server at concurrency {args.client_concurrency}, median of "
        f"{args.repeats}",
        client_rows,
        list(client_rows[0]),
    )
    common.write_results(
        "serving",
        {
            "threads": args.threads,
            "table": rows,
            "client_table": client_rows,
            "medians": medians,
            "samples": {s.name: s.samples for s in sides},
            "clients": client_payload,
        },
    )


if __name__ == "__main__":
    main()
