"""Serving engines: an OpenAI-compatible server for a model, a run, or an external URL.

`serve(config, ...)` is the one way lmstack puts a model behind HTTP. It resolves
what to serve (a run directory becomes its merged model with the run's tokenizer,
chat template and generation config), starts the engine as a child process on
127.0.0.1 and a free port, waits for its health endpoint, yields an `Endpoint`,
and always stops the engine: on success, on errors, on Ctrl-C and on SIGTERM.
With `serving.gateway` on, lmstack's tracing gateway sits in front of the engine.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError, LmstackError

HEALTH_POLL_S = 0.25
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 20


class EngineError(LmstackError):
    """The engine could not be started or reached."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # "http://127.0.0.1:PORT/v1"
    model: str  # the "model" field requests must send
    api_key: str = "EMPTY"
    engine: str = "hf"
    # what is served: path, run_id, artifact_hash, quantization
    served: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def serve(
    config: Any, cache_dir: str | Path, log_dir: Path, gateway: bool | None = None
) -> Iterator[Endpoint]:
    """The configured engine, healthy, for the duration of the `with` block."""
    serving = config.serving
    if serving.ab.variants and gateway is not False:
        with _sigterm_as_exit(), serve_variants(config, str(cache_dir), log_dir) as endpoint:
            yield endpoint
        return
    with _sigterm_as_exit():
        if serving.name == "external":
            upstream_cm = _external(serving)
        else:
            model_path, served = servable_model(config, str(cache_dir))
            upstream_cm = _engine(serving, model_path, served, log_dir)
        with upstream_cm as upstream:
            use_gateway = serving.gateway if gateway is None else gateway
            if not use_gateway:
                yield upstream
                return
            from lmstack.serving.gateway import gateway as tracing_gateway

            with tracing_gateway(upstream, config, log_dir) as proxied:
                yield proxied


# ---- what to serve -------------------------------------------------------------------


def servable_model(config: Any, cache_dir: str) -> tuple[str, dict[str, Any]]:
    """A Hugging Face folder (or hub id) to serve, and the identity of what it holds."""
    from lmstack.models.loading import model_from_run, resolve_base_path
    from lmstack.tracking.run_dir import read_json

    source = config.serving.model
    run_id = None
    if not source:
        path = resolve_base_path(config.model, cache_dir)
    elif (Path(source) / "status.json").is_file():
        path = str(model_from_run(Path(source)))
        run_id = (read_json(Path(source) / "status.json") or {}).get("run_id")
    elif (Path(source) / "config.json").is_file():
        path = source
    elif Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        raise ConfigError(
            f"serving.model: '{source}' is neither an lmstack run directory (status.json) "
            "nor a Hugging Face model folder (config.json)"
        )
    else:
        path = source  # a hub id: the engine fetches it
    path = str(Path(path).resolve()) if Path(path).exists() else path
    served = {
        "path": path,
        "run_id": run_id,
        "artifact_hash": artifact_hash(path),
        "quantization": config.serving.quantization,
    }
    return path, served


def artifact_hash(path: str) -> str | None:
    """Hash of a model folder's files: small files by content, large ones by size, head
    and tail (hashing gigabytes of weights on every start would cost seconds)."""
    import hashlib

    folder = Path(path)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        size = file.stat().st_size
        with open(file, "rb") as handle:
            if size <= 64 << 20:
                digest.update(handle.read())
            else:
                digest.update(str(size).encode() + handle.read(1 << 20))
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


# ---- engines -----------------------------------------------------------------------


def engine_command(serving: Any, model_path: str, port: int) -> list[str]:
    """The engine's command line, as a user would type it."""
    if serving.name == "hf":
        threads = engine_threads(serving.num_threads)
        command = ["env", f"OMP_NUM_THREADS={threads}"] if threads else []
        command += [*_transformers_cli(), "serve", model_path, "--host", serving.host]
        command += ["--port", str(port), "--device", "auto"]
        command.append(
            "--continuous-batching" if serving.continuous_batching else "--no-continuous-batching"
        )
        if serving.continuous_batching and serving.cb_num_blocks:
            command += ["--cb-num-blocks", str(serving.cb_num_blocks)]
        if serving.continuous_batching and serving.cb_max_batch_tokens:
            command += ["--cb-max-batch-tokens", str(serving.cb_max_batch_tokens)]
        if serving.quantization != "none":
            command += [
                "--quantization",
                {"int8": "bnb-8bit", "nf4": "bnb-4bit"}[serving.quantization],
            ]
    elif serving.name == "vllm":
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        command += ["--model", model_path, "--host", serving.host, "--port", str(port)]
        command += ["--served-model-name", served_name(serving, model_path)]
        if serving.quantization != "none":
            command += ["--quantization", serving.quantization]
    else:
        raise ConfigError(f"serving.name: '{serving.name}' starts no engine")
    return command + list(serving.extra_args)


def engine_threads(num_threads: int) -> int | None:
    """serving.num_threads as a count; None leaves torch's default."""
    if num_threads >= 0:
        return num_threads or None
    return max(1, len(os.sched_getaffinity(0)) - 1)  # the cores this job may use, but one


def served_name(serving: Any, model_path: str) -> str:
    """transformers serve pins the model to its path; vLLM takes any name."""
    if serving.name == "hf":
        return model_path
    return serving.served_model_name or model_path


def vllm_lora_arguments(run_dir: Path, name: str) -> tuple[str, list[str]]:
    """vLLM with --enable-lora: the adapter's base, and the flags that load the adapter."""
    import json

    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(
            f"serving.enable_lora: '{run_dir}' holds no adapter/ (full fine-tune?); "
            "serve its merged model with serving.enable_lora=false"
        )
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    return base, ["--enable-lora", "--lora-modules", f"{name}={adapter}"]


@contextlib.contextmanager
def _engine(
    serving: Any, model_path: str, served: dict[str, Any], log_dir: Path
) -> Iterator[Endpoint]:
    port = _choose_port(serving)
    model_name = served_name(serving, model_path)
    command = engine_command(serving, model_path, port)
    if serving.name == "vllm" and serving.enable_lora and serving.model:
        model_name = serving.served_model_name or "lmstack-adapter"
        base, lora_flags = vllm_lora_arguments(Path(serving.model), model_name)
        command = engine_command(serving, base, port) + lora_flags
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"engine-{serving.name}.log"
    process = start_process(command, log_path)
    base_url = f"http://{serving.host}:{port}"
    try:
        print(
            f"lmstack: starting {serving.name} engine on {base_url} (log: {log_path})", flush=True
        )
        wait_until_healthy(process, f"{base_url}/health", serving.startup_timeout_s, log_path)
        yield Endpoint(f"{base_url}/v1", model_name, "EMPTY", serving.name, served)
    finally:
        stop_process(process)


@contextlib.contextmanager
def _external(serving: Any) -> Iterator[Endpoint]:
    """An already running server: checked through /v1/models, never started or stopped."""
    import httpx

    api_key = serving.api_key or (
        os.environ.get(serving.api_key_env) if serving.api_key_env else ""
    )
    if serving.api_key_env and not api_key:
        raise ConfigError(
            f"serving.api_key_env: the environment variable {serving.api_key_env} is unset"
        )
    base_url = serving.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{base_url}/models", headers=headers, timeout=10)
        answer.raise_for_status()
    except httpx.HTTPError as error:
        raise EngineError(
            f"serving.base_url: {base_url}/models did not answer ({type(error).__name__}: {error})"
        ) from None
    listed = [entry.get("id") for entry in answer.json().get("data", [])]
    model = serving.served_model_name or (listed[0] if listed else "")
    if not model:
        raise EngineError(f"serving.served_model_name: {base_url} lists no models; name one")
    yield Endpoint(
        base_url, model, api_key or "EMPTY", "external", {"path": model, "url": base_url}
    )


# ---- A/B tests: every variant's engine behind one gateway --------------------------


@contextlib.contextmanager
def serve_variants(config: Any, cache_dir: str, log_dir: Path) -> Iterator[Any]:
    """One engine per distinct variant model (or each variant's external URL), the gateway in
    front of them all; yields the gateway's Endpoint (any "model" name is accepted)."""
    from lmstack.serving.ab import AB_MODEL, write_weights
    from lmstack.serving.gateway import gateway

    serving = config.serving
    with contextlib.ExitStack() as stack:
        started: dict[tuple[str, str], Any] = {}
        entries = []
        for variant in serving.ab.variants:
            key = (variant.base_url, variant.model or serving.model)
            if key not in started:
                alone = variant_serving(serving, variant)
                print(f"lmstack: A/B variant {variant.name}: {alone.model or alone.base_url}")
                started[key] = stack.enter_context(
                    serve(
                        replace(config, serving=alone),
                        cache_dir,
                        Path(log_dir) / f"variant-{variant.name}",
                        gateway=False,
                    )
                )
            endpoint = started[key]
            served = {**endpoint.served, "variant": variant.name}
            entries.append(
                {
                    "name": variant.name,
                    "weight": variant.weight,
                    "upstream": endpoint.base_url,
                    "model": endpoint.model,
                    "served": served,
                }
            )
        first = next(iter(started.values()))
        trace_path = getattr(getattr(config, "trace", None), "path", "")
        write_weights(entries, Path(trace_path).parent if trace_path else Path(log_dir))
        proxied = stack.enter_context(gateway(first, config, log_dir, variants=entries))
        yield replace(proxied, model=AB_MODEL, served={"ab": entries})


def variant_serving(serving: Any, variant: Any) -> Any:
    """The serving config for one variant alone: its model, or its external URL; no A/B."""
    from lmstack.config.schema import ABConfig

    if variant.base_url:
        return replace(
            serving,
            name="external",
            base_url=variant.base_url,
            served_model_name=variant.model,
            quantization="none",
            ab=ABConfig(),
        )
    return replace(serving, model=variant.model or serving.model, ab=ABConfig())


def _transformers_cli() -> list[str]:
    """The `transformers` command of this Python environment."""
    script = Path(sys.executable).parent / "transformers"
    if script.is_file():
        return [str(script)]
    code = "import sys; from transformers.cli.transformers import main; sys.exit(main())"
    return [sys.executable, "-c", code]


def _choose_port(serving: Any) -> int:
    if serving.port == 0:
        return free_port(serving.host)
    with socket.socket() as probe:
        try:
            probe.bind((serving.host, serving.port))
        except OSError:
            raise ConfigError(
                f"serving.port: {serving.host}:{serving.port} is already in use "
                "(pick another port, or serving.port=0 for a free one)"
            ) from None
    return serving.port


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def start_process(
    command: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """A server (engine or gateway) in its own session, so a terminal's Ctrl-C reaches lmstack,
    which stops it; and told by the kernel to exit if lmstack dies without stopping it."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes it for its whole life
    log.write(f"$ {shlex.join(command)}\n".encode())
    log.flush()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    try:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_exit_with_parent,
        )
    except FileNotFoundError as error:
        raise EngineError(f"serving: cannot start {command[0]} ({error})") from None
    finally:
        log.close()


def _exit_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def wait_until_healthy(
    process: subprocess.Popen,
    health_url: str,
    timeout_s: float,
    log_path: Path,
    what: str = "the engine",
) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineError(
                f"serving: {what} exited with code {process.returncode} before it was "
                f"healthy; its last log lines ({log_path}):\n{log_tail(log_path)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        time.sleep(HEALTH_POLL_S)
    raise EngineError(
        f"serving.startup_timeout_s: {what} was not healthy at {health_url} after "
        f"{timeout_s:g} s; its last log lines ({log_path}):\n{log_tail(log_path)}"
    )


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The log's last lines, led by any earlier error lines (a usage error, say, comes
    before a long help text)."""
    import re

    if not log_path.is_file():
        return "  (no log)"
    text = log_path.read_text(errors="replace").replace("\r", "\n").splitlines()
    text = [line for line in text if line.strip()]
    tail_start = max(len(text) - lines, 0)
    errors = [
        line
        for line in text[:tail_start]
        if re.search(r"\b(Error|error|Traceback|Exception)\b", line)
    ][-5:]
    shown = [*errors, *(["  ..."] if errors else []), *text[tail_start:]]
    return "\n".join(f"  {line}" for line in shown) or "  (empty log)"


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to the engine's process group, SIGKILL after a grace period."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_s)
            return


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (Slurm's scancel, a supervisor) unwinds like Ctrl-C, so engines are stopped."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
