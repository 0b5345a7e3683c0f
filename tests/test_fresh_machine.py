"""What makes a fresh machine pass: the lock is what is installed, engines are filed by CPU
kind, an engine killed by a signal is named, and the upstream canary reads its own results.

All real: the installed distributions, real processes killed by real signals, a real pytest
run for the canary's junit parsing.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from lmstack.serving.engine_llamacpp import LlamaCppEngine, loaded_cpu_variant
from lmstack.serving.processes import EngineError, start_process, wait_until_healthy
from lmstack.util.cpu_kind import cpu_kind, llamacpp_level
from lmstack.util.signals import how_it_ended

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import upstream_canary  # noqa: E402  (scripts/ is no package)


@pytest.mark.skipif(
    os.environ.get("LMSTACK_LATEST_CANARY") == "1", reason="the canary installs newer versions"
)
def test_the_installed_versions_are_the_locked_ones():
    """`make install` installs the lock exactly: a version that differs here came from
    somewhere else (a hand install, an unpinned extra) and a fresh machine would not have it."""
    differ = {
        name: (version, importlib.metadata.version(name))
        for name, version in upstream_canary.all_locked_versions().items()
        if importlib.metadata.version(name) != version
    }
    assert not differ, f"installed versions differ from requirements/*.txt: {differ}"


def test_every_dependency_of_the_installed_extras_is_locked():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = re.search(r"^EXTRAS := (\S+)", (REPO / "Makefile").read_text(), re.M)[1]
    wanted = list(project["dependencies"])
    for extra in extras.split(","):
        wanted += project["optional-dependencies"][extra]
    names = {upstream_canary.normalized(re.split(r"[\[<>=!~; ]", spec)[0]) for spec in wanted}
    assert names and not names - set(upstream_canary.all_locked_versions()), names - set(
        upstream_canary.all_locked_versions()
    )


INTEL_AMX = "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n"
AMD_AVX2 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpu_kind_names_vendor_and_widest_vector_instructions():
    machine = os.uname().machine
    assert cpu_kind(INTEL_AMX) == f"intel-{machine}-avx512-bf16-amx"
    assert cpu_kind(AMD_AVX2) == f"amd-{machine}-avx2"
    assert (
        cpu_kind()
        == subprocess.run(  # the Makefile's key is the same as lmstack's
            [sys.executable, REPO / "src/lmstack/util/cpu_kind.py"], capture_output=True, text=True
        ).stdout.strip()
    )


def cpuinfo_with(*flags: str) -> str:
    return f"vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 {' '.join(flags)}\n"


HASWELL_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
AVX512_FLAGS = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="llama.cpp's x86 levels")
def test_llamacpp_is_compiled_for_the_best_x86_level_this_cpu_runs():
    assert llamacpp_level(cpuinfo_with()) == "x64"
    assert llamacpp_level(cpuinfo_with(*HASWELL_FLAGS)) == "haswell"  # an AVX2 AMD EPYC
    assert llamacpp_level(cpuinfo_with(*HASWELL_FLAGS[:-1])) == "piledriver"  # no BMI2
    assert llamacpp_level(cpuinfo_with(*HASWELL_FLAGS, *AVX512_FLAGS)) == "skylakex"
    # one AVX-512 part missing: not an AVX-512 level
    assert llamacpp_level(cpuinfo_with(*HASWELL_FLAGS, *AVX512_FLAGS[:-1])) == "haswell"
    assert llamacpp_level(cpuinfo_with(*HASWELL_FLAGS, "avx_vnni")) == "alderlake"
    # an Intel Xeon with AMX: zen4 (AVX-512 VNNI/BF16), never the AMX level that died of SIGILL
    xeon = (*HASWELL_FLAGS, *AVX512_FLAGS, "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx_vnni")
    assert llamacpp_level(cpuinfo_with(*xeon, "amx_tile", "amx_int8")) == "zen4"
    made = subprocess.run(  # the Makefile compiles the same level, and files the build under it
        ["make", "-n", "-p", "engines"], cwd=REPO, capture_output=True, text=True
    ).stdout
    assert f"LLAMACPP_LEVEL := {llamacpp_level()}" in made
    assert f"-{cpu_kind()}-{llamacpp_level()}/.built" in made


def test_an_engine_built_for_another_cpu_kind_is_started_with_a_warning(tmp_path, capsys):
    environment = tmp_path / "engines" / "llamacpp"
    (environment / "bin").mkdir(parents=True)
    (environment / "bin" / "llama-server").write_text("")
    serving = type("Serving", (), {"python": ""})()
    (environment / ".built").write_text(cpu_kind() + "\n")
    LlamaCppEngine().executable(serving, str(tmp_path / "engines"))
    assert "warning" not in capsys.readouterr().out
    # a kind that is not this machine's (the test runs on AMD and Intel CPUs alike)
    other = next(k for k in ("amd-x86_64-avx2", "intel-x86_64-avx512") if k != cpu_kind())
    (environment / ".built").write_text(f"{other}\n")
    LlamaCppEngine().executable(serving, str(tmp_path / "engines"))
    assert f"built on a {other} CPU, this one is {cpu_kind()}" in capsys.readouterr().out


def test_an_engine_killed_by_sigill_is_named_with_its_cause(tmp_path):
    dies = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    log = tmp_path / "engine.log"
    process = start_process([sys.executable, "-c", dies], log)
    with pytest.raises(EngineError) as error:
        wait_until_healthy(process, "http://127.0.0.1:9/health", 30, log)
    assert "ended (killed by SIGILL, an illegal instruction" in str(error.value)
    assert "rebuild it with `make engines`" in str(error.value)
    assert how_it_ended(-signal.SIGKILL) == "killed by SIGKILL"
    assert how_it_ended(3) == "exit 3"


def test_llamacpp_cpu_variant_is_read_from_its_backend_line():
    log = (
        "load_backend: loaded RPC backend from /e/bin/libggml-rpc.so\n"
        "load_backend: loaded CPU backend from /e/bin/libggml-cpu-zen4.so\n"
    )
    assert loaded_cpu_variant(log) == "zen4"
    assert loaded_cpu_variant("load_backend: loaded CPU backend from /b/libggml-cpu.so") == (
        "this CPU"
    )
    assert loaded_cpu_variant("main: server is listening\n") == "unknown"


def test_the_canary_reports_changed_versions_and_broken_tests(tmp_path):
    suite = tmp_path / "test_sample.py"
    suite.write_text(
        textwrap.dedent(
            """
            def test_holds():
                assert True

            def test_breaks():
                assert 1 == 2, "upstream moved"
            """
        )
    )
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            suite,
            "-o",
            "addopts=",
            f"--junitxml={junit}",
        ],
        capture_output=True,
        cwd=tmp_path,
    )
    counts, broken = upstream_canary.broken_tests(junit)
    assert counts["tests"] == 2 and counts["failures"] == 1
    ((name, why),) = broken
    assert name.endswith("::test_breaks") and "upstream moved" in why
    changes = upstream_canary.version_changes(
        {"torch": "2.13.0", "peft": "0.21.2"}, {"torch": "2.13.0", "peft": "0.22.0", "new-dep": "1"}
    )
    assert changes == [("new-dep", "-", "1"), ("peft", "0.21.2", "0.22.0")]
    text = upstream_canary.report(changes, {"peft": "0.22.0"}, "", counts, broken, ran=True)
    assert "| peft | 0.21.2 | 0.22.0 |" in text and "1 failed" in text and "BROKEN" in text
    # a suite stopped at the time limit before its junit XML: counted from its progress lines
    log = "tests/test_a.py ..s.  [ 10%]\ntests/test_b.py .F\n..F.   [ 20%]\nplatform linux\n"
    counts, broken = upstream_canary.counts_from_log(log + "tests/test_c.py .")
    assert counts == {"tests": 11, "failures": 2, "errors": 0, "skipped": 1}
    assert [name for name, _ in broken] == ["tests/test_b.py"]


def wait_dead_unreaped(pid: int, timeout_s: float = 30) -> None:
    """Until the child has exited, leaving it for its parent to reap (WNOWAIT): psutil's wait
    would reap it and hide its signal from lmstack."""
    deadline = time.monotonic() + timeout_s
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    while os.waitid(os.P_PID, pid, flags) is None and time.monotonic() < deadline:
        time.sleep(0.1)


def test_an_engine_that_dies_while_serving_is_named_with_its_cause(tiny_base, tmp_path, capsys):
    """A kernel the CPU cannot run may first be reached by a request, after the engine was
    healthy: the requests fail, and lmstack says how the engine ended (a SIGKILL here: the
    Python engine's own handlers catch SIGILL, llama-server's native code does not)."""
    import psutil
    from hydra import compose, initialize_config_dir

    from lmstack.config.store import register_configs
    from lmstack.launch import validate
    from lmstack.serving.engines import serve

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        config = validate(compose("config", [f"serving.model={tiny_base}", "logger=none"]))
    with serve(config, str(tiny_base.parent), tmp_path, gateway=False):
        (engine,) = psutil.Process().children()
        engine.send_signal(signal.SIGKILL)
        wait_dead_unreaped(engine.pid)
    out = capsys.readouterr().out
    assert "lmstack: the hf engine ended while serving (killed by SIGKILL); its log: " in out
