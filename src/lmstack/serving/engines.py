"""Serving engines: an OpenAI-compatible server for a model, a run, or an external URL.

`serve(config, ...)` is the one way lmstack puts a model behind HTTP. The engine plug-in
(lmstack.serving.engine_api.Engine: hf, vllm, llamacpp) says what it can quantize on which
device, where its own environment is, what it loads and how it is started; this module
checks the request against that, starts the engine as a child process on 127.0.0.1 and a
free port with a scratch folder for its temporary files, waits for its health endpoint,
yields an `Endpoint`, and always stops it and removes the scratch folder: on success, on
errors, on Ctrl-C and on SIGTERM. With `serving.gateway` on, lmstack's tracing gateway sits
in front of the engine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmstack.config.groups.serving import ENGINE_RECORDS, ABConfig, ExternalServingConfig
from lmstack.errors import ConfigError
from lmstack.serving.ab import AB_MODEL, write_weights
from lmstack.serving.engine_api import (
    Engine,
    artifact_hash,
    current_device,
    servable_model,
    short_model_name,
)
from lmstack.serving.engine_vllm import multi_lora_target
from lmstack.serving.gateway_process import gateway as tracing_gateway
from lmstack.serving.processes import (
    EngineError,
    free_port,
    log_tail,
    start_process,
    stop_process,
    wait_until_healthy,
)
from lmstack.serving.promotion import register_rule
from lmstack.tracking.run_dir import read_json
from lmstack.util import openai_api
from lmstack.util.signals import how_it_ended, resent_from_finalizer

# a Unix socket path holds at most 107 bytes; vLLM puts a 36-character name in the folder
MAX_SCRATCH_PATH = 64

__all__ = [
    "Endpoint",
    "EngineError",
    "artifact_hash",
    "current_device",
    "engine_for",
    "free_port",
    "log_tail",
    "servable_model",
    "serve",
    "start_process",
    "stop_process",
    "wait_until_healthy",
]


@functools.cache
def engine_for(name: str) -> Engine:
    """The engine `serving=NAME` starts: its record's implementation, imported now (a
    plug-in's engine loads the same way as the built-in ones)."""
    record = ENGINE_RECORDS[name]
    module_name, _, class_name = record.implementation.partition(":")
    engine = getattr(importlib.import_module(module_name), class_name)()
    if not isinstance(engine, Engine) or engine.name != name:
        raise TypeError(f"engine {name}: {record.implementation} is no Engine named '{name}'")
    return engine


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # "http://127.0.0.1:PORT/v1"
    model: str  # the "model" field requests must send
    api_key: str = "EMPTY"
    engine: str = "hf"
    # what is served: path, run_id, artifact_hash, quantization
    served: dict[str, Any] = field(default_factory=dict)
    # the engine process lmstack started, watched while serving (None: an external URL)
    watch: EngineWatch | None = field(default=None, repr=False, compare=False)

    def public(self) -> dict[str, Any]:
        """What a client needs, as endpoint.json keeps it."""
        return {k: v for k, v in self.__dict__.items() if k != "watch"}


RESTART_BACKOFF_S = (1, 2, 4, 8, 16, 30)  # seconds before each restart, the last repeated


@dataclass
class EngineWatch:
    """An engine process while phase=serve serves it: `check()` notices that it ended and
    does what serving.on_engine_exit says: `fail` (the run fails, with the engine's last
    log lines) or `restart` (on the same port, after a backoff, at most max_restarts
    times; the gateway in front reconnects by itself)."""

    name: str
    start: Any  # () -> subprocess.Popen: the engine, started again the same way
    process: Any
    health_url: str
    log_path: Path
    startup_timeout_s: float
    on_exit: str = "fail"
    max_restarts: int = 5
    restarts: int = 0

    def check(self) -> None:
        if self.process.poll() is None:
            return
        how = how_it_ended(self.process.returncode)
        if self.on_exit == "fail" or self.restarts >= self.max_restarts:
            after = f" after {self.restarts} restarts" if self.restarts else ""
            raise EngineError(
                f"serving: the {self.name} engine ended while serving ({how}){after}; "
                f"its last log lines ({self.log_path}):\n{log_tail(self.log_path)}"
            )
        wait_s = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        self.restarts += 1
        print(
            f"lmstack: the {self.name} engine ended while serving ({how}); restart "
            f"{self.restarts} of {self.max_restarts} in {wait_s}s (serving.on_engine_exit=restart)",
            flush=True,
        )
        time.sleep(wait_s)
        self.process = self.start()
        wait_until_healthy(self.process, self.health_url, self.startup_timeout_s, self.log_path)
        print(f"lmstack: the {self.name} engine is serving again", flush=True)


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
            upstream_cm = _engine(config, str(cache_dir), Path(log_dir))
        use_gateway = serving.gateway if gateway is None else gateway
        asked = gateway is None  # the user's serving.gateway, not an internal engine start
        if asked and not use_gateway and serving.name == "hf" and serving.served_model_name:
            raise ConfigError(
                "serving.served_model_name: the hf engine answers only to its model's path; "
                "keep serving.gateway=true, which serves it under this name"
            )
        with upstream_cm as upstream:
            if not use_gateway:
                yield upstream
                return

            name = public_model_name(serving, upstream)
            with tracing_gateway(upstream, config, log_dir, name=name) as proxied:
                yield proxied


@contextlib.contextmanager
def _engine(config: Any, cache_dir: str, log_dir: Path) -> Iterator[Endpoint]:
    serving = config.serving
    engine = engine_for(serving.name)
    # checks that need no model: the environment, then what it can quantize on its device
    executable = engine.executable(serving, config.paths.engines_dir)
    engine.check_quantization(serving, engine.device(executable))
    port = _choose_port(serving)
    target = engine.target(config, cache_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"engine-{serving.name}.log"
    with scratch_folder(cache_dir, serving.name) as scratch:
        device = engine.device(executable)
        launch = engine.launch(serving, target, executable, device, port, scratch)
        env = {"TMPDIR": str(scratch), **engine_offline_env(target.path), **serving.env}
        note = engine.startup_note(executable)
        if note:
            print(f"lmstack: {serving.name}: {note}", flush=True)
        base_url = f"http://{serving.host}:{port}"
        watch = EngineWatch(
            name=serving.name,
            start=lambda: start_process(launch.command, log_path, env),
            process=start_process(launch.command, log_path, env),
            health_url=f"{base_url}{engine.health_path}",
            log_path=log_path,
            startup_timeout_s=serving.startup_timeout_s,
            on_exit=serving.on_engine_exit,
            max_restarts=serving.max_engine_restarts,
        )
        try:
            print(
                f"lmstack: starting {serving.name} engine on {base_url} (log: {log_path})",
                flush=True,
            )
            wait_until_healthy(watch.process, watch.health_url, serving.startup_timeout_s, log_path)
            yield Endpoint(
                f"{base_url}/v1", launch.model_name, "EMPTY", serving.name, target.served, watch
            )
        finally:
            process = watch.process
            if process.poll() is not None:  # it died under the requests: say how, not just them
                print(
                    f"lmstack: the {serving.name} engine ended while serving "
                    f"({how_it_ended(process.returncode)}); its log: {log_path}",
                    flush=True,
                )
            stop_process(process)


def engine_offline_env(model_path: str) -> dict[str, str]:
    """A local model needs no hub: engines then never wait on a network lookup."""
    return {"HF_HUB_OFFLINE": "1"} if Path(model_path).exists() else {}


def public_model_name(serving: Any, upstream: Endpoint) -> str:
    """What clients send as `model`: serving.served_model_name, else the run id or the
    model's short name. The gateway maps it to the name the engine answers to."""
    if serving.name == "external":
        return serving.served_model_name or upstream.model
    if serving.served_model_name:
        return serving.served_model_name
    served = upstream.served or {}
    if serving.name == "vllm":
        return upstream.model
    return short_model_name(str(served.get("path") or upstream.model), served.get("run_id"))


@contextlib.contextmanager
def scratch_folder(cache_dir: str, engine: str) -> Iterator[Path]:
    """The engine's temporary files (compile caches, sockets): under the cache directory
    when its path is short enough for Unix sockets, else a private temporary folder;
    removed when the engine has stopped."""
    parent = Path(cache_dir).resolve() / "scratch"
    if len(str(parent)) + len(engine) + 12 > MAX_SCRATCH_PATH:
        parent = Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{engine}-", dir=parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if parent.name == "scratch":
            with contextlib.suppress(OSError):  # another engine still uses it
                parent.rmdir()


@contextlib.contextmanager
def _external(serving: Any) -> Iterator[Endpoint]:
    """An already running server: checked through /v1/models, never started or stopped."""
    api_key = serving.api_key or (
        os.environ.get(serving.api_key_env) if serving.api_key_env else ""
    )
    if serving.api_key_env and not api_key:
        raise ConfigError(
            f"serving.api_key_env: the environment variable {serving.api_key_env} is unset"
        )
    base_url = serving.base_url.rstrip("/")
    try:
        listed = openai_api.model_ids(base_url, api_key, 10.0)
    except (openai_api.Unreachable, openai_api.ErrorAnswer) as error:
        raise EngineError(
            f"serving.base_url: {base_url}/models did not answer ({openai_api.describe(error)})"
        ) from None
    model = serving.served_model_name or (listed[0] if listed else "")
    if not model:
        raise EngineError(f"serving.served_model_name: {base_url} lists no models; name one")
    yield Endpoint(
        base_url, model, api_key or "EMPTY", "external", {"path": model, "url": base_url}
    )


# ---- A/B tests: every variant's engine behind one gateway --------------------------


@contextlib.contextmanager
def serve_variants(config: Any, cache_dir: str, log_dir: Path) -> Iterator[Any]:
    """The variants' engines with the gateway in front of them all; yields the gateway's
    Endpoint (any "model" name is accepted). Variants that are LoRA adapters of one base on
    vLLM (serving.enable_lora) share one engine, each answering to its adapter's name
    (multi-LoRA); otherwise one engine per distinct model, or each variant's external URL."""

    serving = config.serving
    trace_path = getattr(getattr(config, "trace", None), "path", "")
    store_folder = Path(trace_path).parent if trace_path else Path(log_dir)
    # before any engine starts: a store registered under another rule is refused at once
    register_rule(serving.ab.promotion, [v.name for v in serving.ab.variants], store_folder)
    with contextlib.ExitStack() as stack:
        shared = shared_lora_serving(config, cache_dir)
        if shared is not None:
            entries, first = multi_lora_entries(config, shared, cache_dir, log_dir, stack)
        else:
            entries, first = engine_per_variant_entries(config, cache_dir, log_dir, stack)
        write_weights(entries, store_folder)
        proxied = stack.enter_context(tracing_gateway(first, config, log_dir, variants=entries))
        yield replace(proxied, model=AB_MODEL, served={"ab": entries})


def engine_per_variant_entries(
    config: Any, cache_dir: str, log_dir: Path, stack: contextlib.ExitStack
) -> tuple[list[dict[str, Any]], Any]:
    """The variants' entries for the gateway, and the first engine's Endpoint."""
    serving = config.serving
    started: dict[tuple[str, str], Any] = {}
    entries = []
    for variant in serving.ab.variants:
        key = (variant.base_url, variant.model or serving.model)
        if key not in started:
            alone = variant_serving(serving, variant)
            what = variant.base_url or variant.model or serving.model or "the model group's model"
            print(f"lmstack: A/B variant {variant.name}: {what}")
            started[key] = stack.enter_context(
                serve(
                    replace(config, serving=alone),
                    cache_dir,
                    Path(log_dir) / f"variant-{variant.name}",
                    gateway=False,
                )
            )
        endpoint = started[key]
        mode = "external" if variant.base_url else "own engine"
        served = {**endpoint.served, "variant": variant.name}
        entries.append(variant_entry(variant, endpoint, endpoint.model, served, mode))
    return entries, next(iter(started.values()))


def variant_entry(variant: Any, endpoint: Any, model: str, served: dict, mode: str) -> dict:
    return {
        "name": variant.name,
        "weight": variant.weight,
        "upstream": endpoint.base_url,
        "model": model,
        "served": served,
        "mode": mode,  # own engine | multi-LoRA | external, in the A/B report
        "source": variant.model or variant.base_url,  # the run directory: its lineage, if any
    }


def shared_lora_serving(config: Any, cache_dir: str) -> Any | None:
    """vLLM's serving config with every variant as a LoRA module, when they are adapters of
    one base (serving=vllm serving.enable_lora=true, no base_url); None otherwise."""
    serving = config.serving
    variants = serving.ab.variants
    models = {v.name: v.model or serving.model for v in variants}
    if serving.name != "vllm" or not serving.enable_lora or any(v.base_url for v in variants):
        return None
    if len(set(models.values())) < 2:
        return None  # one model: one engine either way
    shared = replace(serving, lora_modules=models, ab=ABConfig(), served_model_name="")
    try:
        multi_lora_target(replace(config, serving=shared), cache_dir)
    except ConfigError as error:  # adapters of different bases: an engine each
        print(f"lmstack: A/B: one engine per variant, not one multi-LoRA engine: {error}")
        return None
    return shared


def multi_lora_entries(
    config: Any, shared: Any, cache_dir: str, log_dir: Path, stack: contextlib.ExitStack
) -> tuple[list[dict[str, Any]], Any]:
    names = ", ".join(shared.lora_modules)
    print(f"lmstack: A/B variants {names}: LoRA adapters of one base, served by one vLLM engine")
    endpoint = stack.enter_context(
        serve(replace(config, serving=shared), cache_dir, Path(log_dir) / "variants", gateway=False)
    )
    entries = []
    for variant in config.serving.ab.variants:
        adapter = endpoint.served["adapters"][variant.name]
        served = {
            **endpoint.served,
            "adapter": adapter,
            "run_id": run_id_of(Path(adapter).parent),
            "artifact_hash": artifact_hash(adapter),
            "variant": variant.name,
        }
        served.pop("adapters")
        entries.append(variant_entry(variant, endpoint, variant.name, served, "multi-LoRA"))
    return entries, endpoint


def run_id_of(run_dir: Path) -> str | None:
    return (read_json(run_dir / "status.json") or {}).get("run_id")


def variant_serving(serving: Any, variant: Any) -> Any:
    """The serving config for one variant alone: its model, or its external URL; no A/B."""

    if variant.base_url:
        # another engine's schema has no base_url: an external server is its own schema
        return ExternalServingConfig(
            host=serving.host,
            base_url=variant.base_url,
            served_model_name=variant.model,
            gateway=serving.gateway,
            ab=ABConfig(),
        )
    return replace(serving, model=variant.model or serving.model, ab=ABConfig())


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


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (Slurm's scancel, a supervisor) unwinds like Ctrl-C, so engines are stopped."""

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: Any) -> None:
        if not resent_from_finalizer(signum, frame):
            raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
