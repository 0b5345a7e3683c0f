"""What the tracing gateway costs: the same bench with serving.gateway=true and false.

    .venv/bin/python benchmarks/gateway_overhead.py --rounds 3 --num-requests 32 \
        --max-concurrency 8 --max-tokens 32
    .venv/bin/python benchmarks/gateway_overhead.py --interleaved --rounds 10

Default: runs `python run.py phase=bench` alternately with and without the gateway (so
a slow spell on a shared machine hits both), each in a fresh output directory.
--interleaved: one engine and one gateway in front of it, and the bench's load client
sending alternate batches straight to the engine and through the gateway: the same
warm engine for both, so the comparison is not swamped by engine start-up and noise.
Prints output throughput, TTFT and latency per round and the median ratio
gateway/engine. Issue 8 asks for gateway throughput within 10% of the engine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("output_throughput", "ttft_ms_p50", "e2el_ms_p50", "e2el_ms_p99")
CPU_FIGURES = tuple(f"{name}_cpu_ms_per_request" for name in ("engine", "gateway", "client"))
CPU_SHARES: list[float] = []  # gateway CPU time / engine CPU time, per interleaved round
THROUGHPUTS: dict[bool, list[float]] = {False: [], True: []}  # per round, without/with gateway


def bench(gateway: bool, args: argparse.Namespace, output_dir: Path) -> dict:
    command = [
        sys.executable,
        str(REPO / "run.py"),
        "phase=bench",
        "logger=none",
        f"serving.gateway={str(gateway).lower()}",
        f"bench.num_requests={args.num_requests}",
        f"bench.max_concurrency={args.max_concurrency}",
        f"bench.max_tokens={args.max_tokens}",
        f"paths.output_dir={output_dir}",
        *args.overrides,
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    (metrics,) = output_dir.rglob("metrics.json")
    return json.loads(metrics.read_text())


def interleaved(args: argparse.Namespace) -> list[float]:
    """Alternate batches to the engine and through the gateway, on one warm engine."""
    import asyncio
    import os

    from hydra import compose, initialize_config_dir

    from lmstack.config.store import register_configs
    from lmstack.launch import validate
    from lmstack.phases.bench import build_requests
    from lmstack.serving.client import LoadSettings, run_load
    from lmstack.serving.engines import serve
    from lmstack.serving.gateway_process import gateway
    from lmstack.serving.metrics import SLO, failure_reasons, summarize

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        config = validate(compose(config_name="config", overrides=["logger=none", *args.overrides]))
    config.bench.num_requests, config.bench.warmup_requests = args.num_requests, 0
    requests = build_requests(config.bench, config.prompt)
    settings = LoadSettings(
        max_tokens=args.max_tokens,
        max_concurrency=args.max_concurrency,
        ignore_eos=config.bench.ignore_eos,  # as the bench does: fixed-length answers
    )
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(config.paths.cache_dir).resolve())
        with (
            serve(config, cache, Path(tmp), gateway=False) as engine,
            gateway(engine, config, Path(tmp)) as proxied,
        ):
            asyncio.run(run_load(requests[:4], engine, settings))  # warm up
            pids = {
                "engine": child_pid("transformers"),
                "gateway": child_pid("serving.gateway"),
                "client": os.getpid(),  # this process: the bench's load client
            }
            for index in range(args.rounds):
                row = {}
                order = (engine, proxied) if index % 2 == 0 else (proxied, engine)
                for endpoint in order:
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    results, duration = asyncio.run(run_load(requests, endpoint, settings))
                    figures = summarize(results, duration, SLO(None, None, None))
                    for name, pid in pids.items():
                        figures[f"{name}_cpu_ms_per_request"] = (
                            (cpu_seconds(pid) - before[name]) * 1000 / len(requests)
                        )
                    if figures["failed"]:
                        raise SystemExit(f"failed requests: {failure_reasons(results)}")
                    row[endpoint is proxied] = {k: figures[k] for k in FIGURES + CPU_FIGURES}
                ratios.append(report_round(index, row))
    return ratios


def child_pid(fragment: str) -> int:
    """The pid of this process's child whose command line holds `fragment`."""
    import os

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and fragment in command:
            return int(entry.name)
    raise SystemExit(f"no child process running {fragment}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report_round(index: int, row: dict[bool, dict[str, float]]) -> float:
    """Print one round's figures; its throughput ratio gateway/engine."""
    ratio = row[True]["output_throughput"] / row[False]["output_throughput"]
    for gateway in (False, True):
        THROUGHPUTS[gateway].append(row[gateway]["output_throughput"])
        figures = "  ".join(f"{k}={v:.1f}" for k, v in row[gateway].items())
        print(f"round {index} gateway={gateway!s:<5} {figures}", flush=True)
    print(f"round {index} throughput gateway/engine = {ratio:.3f}", flush=True)
    if "gateway_cpu_ms_per_request" in row[True]:
        share = row[True]["gateway_cpu_ms_per_request"] / row[True]["engine_cpu_ms_per_request"]
        CPU_SHARES.append(share)
        print(f"round {index} gateway CPU / engine CPU per request = {share:.3f}", flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="more run.py overrides, e.g. serving.model=<run dir>",
    )
    parser.add_argument("--interleaved", action="store_true", help="one engine, alternate")
    args = parser.parse_args()
    ratios = interleaved(args) if args.interleaved else whole_benches(args)
    summarize_rounds(ratios, "gateway_overhead-interleaved" if args.interleaved else None)


def whole_benches(args: argparse.Namespace) -> list[float]:
    """`run.py phase=bench` with and without the gateway, either first in turn."""
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            row = {}
            for gateway in (False, True) if index % 2 == 0 else (True, False):
                metrics = bench(gateway, args, Path(tmp) / f"{index}-{gateway}")
                if metrics["bench/failed"]:
                    raise SystemExit(f"failed requests: {metrics['bench/failure_reasons']}")
                row[gateway] = {key: metrics[f"bench/{key}"] for key in FIGURES}
            ratios.append(report_round(index, row))
    return ratios


def summarize_rounds(ratios: list[float], name: str | None) -> None:
    """Print the medians and write benchmarks/results/<name>.json."""
    from common import load_average, write_results

    means = {side: statistics.mean(values) for side, values in THROUGHPUTS.items()}
    summary = {
        "median_throughput_ratio": statistics.median(ratios),
        "ratio_of_mean_throughputs": means[True] / means[False],
        "mean_throughput_engine": means[False],
        "mean_throughput_gateway": means[True],
    }
    if CPU_SHARES:
        summary["median_gateway_cpu_share"] = statistics.median(CPU_SHARES)
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    rounds = {"ratios": ratios, "throughputs": {str(k): v for k, v in THROUGHPUTS.items()}}
    write_results(name or "gateway_overhead", {**summary, **rounds, "load": load_average()})


if __name__ == "__main__":
    main()
