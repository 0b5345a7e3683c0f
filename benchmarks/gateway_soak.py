"""The tracing gateway under a long soak and a long fuzz: the default suite's
tests/test_gateway_soak.py and tests/test_gateway_fuzz.py, run for minutes instead of seconds.

    .venv/bin/python benchmarks/gateway_soak.py --minutes 5 --concurrency 64 --fuzz-examples 5000
    .venv/bin/python benchmarks/gateway_soak.py --minutes 1 --fuzz-examples 0   # soak only

Each runs through pytest in a child process, so its assertions hold for the long run too
(every completion traced once, no 5xx for a client mistake, memory bounded, no connection
left open; every fuzz case answered well-formed or closed). The soak's figures come back on
its SOAK_RESULT line and are printed as a table; the fuzz draws its cases at random (not the
suite's fixed ones) and reports its outcome, cases and time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from common import ROOT, load_average, machine, print_table, result_line, write_results

SOAK_ROWS = [
    ("requests sent", "sent"),
    ("answered", "answered"),
    ("requests/s", "requests_per_s"),
    ("statuses", "statuses"),
    ("5xx answers", "server_errors"),
    ("unexpected statuses", "unexpected_status"),
    ("431 lost to a reset", "oversized_unanswered"),
    ("gateway RSS at start (MiB)", "rss_start_mb"),
    ("gateway RSS midway (MiB)", "rss_middle_mb"),
    ("gateway RSS at end (MiB)", "rss_end_mb"),
    ("gateway RSS max (MiB)", "rss_max_mb"),
    ("completion traces expected", "expected_traces"),
    ("traces written", "traces"),
    ("traces missing", "missing"),
    ("traced twice", "traced_twice"),
    ("hang-ups traced as such", "hang_ups_traced_as_such"),
    ("client connections left", "client_connections"),
    ("engine connections left", "engine_connections"),
    ("seconds until all closed", "closed_after_s"),
]


def run_tests(test_file: str, env: dict[str, str], timeout_s: float) -> tuple[int, str, float]:
    """pytest on one test file in a child process: (exit code, its output, seconds)."""
    command = [sys.executable, "-m", "pytest", test_file, "-q", "-s", "-p", "no:cacheprovider"]
    started = time.perf_counter()
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return result.returncode, result.stdout + result.stderr, time.perf_counter() - started


def soak(minutes: float, concurrency: int) -> dict:
    seconds = minutes * 60
    env = {"LMSTACK_SOAK_SECONDS": str(seconds), "LMSTACK_SOAK_CONCURRENCY": str(concurrency)}
    print(f"soak: {seconds:g} s at concurrency {concurrency} ...", flush=True)
    code, output, wall_s = run_tests("tests/test_gateway_soak.py", env, seconds + 600)
    figures = result_line(output, "SOAK_RESULT ")
    rows = [{"figure": name, "value": str(figures.get(key, "-"))} for name, key in SOAK_ROWS]
    rows.append({"figure": "test outcome", "value": "passed" if code == 0 else "FAILED"})
    print_table(
        f"Gateway soak ({seconds:g} s, concurrency {concurrency})", rows, ["figure", "value"]
    )
    if code != 0:
        print(output[-4000:])
    return {**figures, "passed": code == 0, "wall_s": round(wall_s, 1)}


def fuzz(examples: int) -> dict:
    print(f"\nfuzz: LMSTACK_FUZZ_EXAMPLES={examples} (random cases) ...", flush=True)
    code, output, wall_s = run_tests(
        "tests/test_gateway_fuzz.py", {"LMSTACK_FUZZ_EXAMPLES": str(examples)}, 6 * 3600
    )
    rss = re.search(r"gateway RSS: ([\d.]+) MiB after warm-up, ([\d.]+) now", output)
    summary = re.findall(
        r"^=*\s*(\d+ (?:passed|failed|xfailed|xpassed|error)[^=]*?)\s*=*$", output, re.M
    )
    result = {
        "examples": examples,
        "passed": code == 0,
        "wall_s": round(wall_s, 1),
        "outcome": summary[-1] if summary else f"exit code {code}",
        "rss_after_warm_up_mb": float(rss.group(1)) if rss else None,
        "rss_at_end_mb": float(rss.group(2)) if rss else None,
    }
    rows = [{"figure": key, "value": str(value)} for key, value in result.items()]
    print_table("Gateway fuzz", rows, ["figure", "value"])
    if code != 0:
        print(output[-6000:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="soak length")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--fuzz-examples", type=int, default=5000, help="HTTP fuzz cases (0: no fuzz run)"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}, load {load_average():.2f}", flush=True)
    results = {"soak": soak(args.minutes, args.concurrency)}
    if args.fuzz_examples:
        results["fuzz"] = fuzz(args.fuzz_examples)
    write_results("gateway_soak", {**results, "load": load_average()})
    if not all(part["passed"] for part in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
