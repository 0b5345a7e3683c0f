"""Start-up overhead: from `python run.py` to the first training step, where that time goes
(imports, composition, model, data, trainer), and how fast a config error answers.

The first-step probe runs run.py unchanged in a child process; a post-import hook
timestamps lmstack's own entry points as they are reached (config composed, model
loaded, data ready, first `training_step`). Import time comes from a separate
`python -X importtime` run of the same command, so the hook costs it nothing.

    .venv/bin/python benchmarks/overhead.py
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# the demo, stopped after one step (W&B offline files and the verifier pass are part of it)
DEMO = ["trainer.max_steps=1", "trainer.enable_progress_bar=false"]
LEAN = [*DEMO, "logger=none", "verify.enabled=false"]
CONFIG_ERRORS = {
    "bad value (trainer.max_steps=0)": ["trainer.max_steps=0"],
    "unknown option (adapter=lorra)": ["adapter=lorra"],
    "unknown key (trainer.max_stepz=5)": ["trainer.max_stepz=5"],
    "--help": ["--help"],
}


# ---------------------------------------------------------------- the probe (child side)

# module -> attribute -> stage label printed when that function returns (or, for
# training_step, when it is first entered)
PROBES = {
    "lmstack.launch": {"build_context": "config composed and checked"},
    "lmstack.models.loading": {"load_for_training": "model loaded"},
    "lmstack.objectives.causal_lm": {"setup": "data tokenised, loaders built"},
}


def _stamp(label: str) -> None:
    elapsed = time.time() - float(os.environ["BENCH_T0"])
    print("BENCH_STAGE " + json.dumps({"stage": label, "s": round(elapsed, 3)}), flush=True)


def _after(function, label):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        _stamp(label)
        return result

    return wrapper


def _patch(module) -> None:
    for attribute, label in PROBES.get(module.__name__, {}).items():
        setattr(module, attribute, _after(getattr(module, attribute), label))
    if module.__name__ == "lmstack.objectives.causal_lm":
        step = module.CausalLMModule.training_step

        def first_step(self, *args, **kwargs):
            if not getattr(self, "_bench_stamped", False):
                self._bench_stamped = True
                _stamp("first training step starts")
            return step(self, *args, **kwargs)

        module.CausalLMModule.training_step = first_step


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Patches a probed module right after it executes, without importing it early."""

    def find_spec(self, name, path, target=None):
        if name not in PROBES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def probe(arguments: list[str]) -> None:
    _stamp("python started")
    sys.meta_path.insert(0, _PostImportHook())
    sys.argv = ["run.py", *arguments]
    sys.path.insert(0, str(common.ROOT))
    import runpy

    runpy.run_path(str(common.ROOT / "run.py"), run_name="__main__")


# ---------------------------------------------------------------- measuring (parent side)


def timed(command: list[str], env_extra: dict[str, str] | None = None):
    env = common.thread_env(1) | {"BENCH_T0": repr(time.time())} | (env_extra or {})
    started = time.perf_counter()
    import subprocess

    done = subprocess.run(command, cwd=common.ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done


def first_step_stages(arguments: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        command = [common.PYTHON, __file__, "--probe", "--", *arguments]
        command.append(f"paths.output_dir={out}")
        _, done = timed(command, {"WANDB_MODE": "offline", "WANDB_DIR": out})
    stages = {}
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_STAGE "):
            item = json.loads(line[len("BENCH_STAGE ") :])
            stages.setdefault(item["stage"], item["s"])
    if "first training step starts" not in stages:
        raise RuntimeError(f"no first step:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return stages


def import_seconds(arguments: list[str]) -> tuple[float, list[tuple[str, float]]]:
    """Total import time of a run (top-level imports' cumulative time) and the largest."""
    with tempfile.TemporaryDirectory() as out:
        command = [common.PYTHON, "-X", "importtime", "run.py", *arguments]
        command.append(f"paths.output_dir={out}")
        _, done = timed(command, {"WANDB_MODE": "offline", "WANDB_DIR": out})
    top = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if match and match.group(2) == "":  # top-level: not imported by another module
            top.append((match.group(3), int(match.group(1)) / 1e6))
    total = sum(seconds for _, seconds in top)
    return total, sorted(top, key=lambda item: -item[1])[:6]


def error_seconds(arguments: list[str], repeats: int) -> tuple[float, int, str]:
    times, last = [], None
    for _ in range(repeats):
        seconds, last = timed([common.PYTHON, "run.py", *arguments])
        times.append(seconds)
    # the first line that says something (Hydra ends with a HYDRA_FULL_ERROR hint)
    lines = [line for line in last.stderr.splitlines() if line.strip()]
    message = next((line for line in lines if "HYDRA_FULL_ERROR" not in line), "")[:90]
    return statistics.median(times), last.returncode, message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.rest)

    rows, payload = [], {"first_step": {}, "errors": {}}
    for name, arguments in (("demo (python run.py)", DEMO), ("lean (no W&B, no verify)", LEAN)):
        first_step_stages(arguments)  # warm the cache (tiny_base, file system)
        runs = []
        for _ in range(args.repeats):
            load = common.load_average()
            stages = first_step_stages(arguments)
            imports, largest = import_seconds(arguments)
            runs.append({"stages": stages, "imports_s": imports, "load": load})
        stage_names = list(runs[0]["stages"])
        median_stages = {
            s: statistics.median(r["stages"].get(s, float("nan")) for r in runs)
            for s in stage_names
        }
        first = median_stages["first training step starts"]
        imports = statistics.median(r["imports_s"] for r in runs)
        rows.append(
            {
                "command": name,
                "to first step s": first,
                "imports s": imports,
                "imports share": f"{100 * imports / first:.0f}%",
                "load": statistics.median(r["load"] for r in runs),
            }
        )
        print(f"\n{name}: {' '.join(['python', 'run.py', *arguments])}")
        previous = 0.0
        for stage, at in median_stages.items():
            print(f"  {at:6.2f} s  (+{at - previous:5.2f})  {stage}")
            previous = at
        print("  largest top-level imports: " + ", ".join(f"{m} {s:.2f}s" for m, s in largest))
        payload["first_step"][name] = {
            "arguments": arguments,
            "stages_s": median_stages,
            "imports_s": imports,
            "largest_imports": largest,
            "runs": runs,
        }
    common.print_table(
        f"time to the first training step, median of {args.repeats}",
        rows,
        list(rows[0]),
    )
    error_rows = []
    for name, arguments in CONFIG_ERRORS.items():
        load = common.load_average()
        seconds, code, message = error_seconds(arguments, max(3, args.repeats))
        error_rows.append(
            {"input": name, "answer s": seconds, "exit": code, "load": load, "says": message}
        )
        payload["errors"][name] = {"seconds": seconds, "exit": code, "message": message}
    common.print_table(
        "config errors: time to the answer (median)", error_rows, list(error_rows[0])
    )
    common.write_results("overhead", {"table": rows, "error_table": error_rows, **payload})


if __name__ == "__main__":
    main()
