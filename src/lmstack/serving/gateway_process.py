"""The tracing gateway as a process: `gateway()` starts it in front of an engine and stops it.

The gateway runs as its own process (`python -m lmstack.serving.gateway`, serving/gateway.py),
so that it never competes with a benchmark client, or the caller's Python, for the GIL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmstack.serving.processes import free_port, start_process, stop_process, wait_until_healthy
from lmstack.serving.traces import TRACE_DB_NAME

log = logging.getLogger("lmstack.gateway")

UPSTREAM_KEY_ENV = "LMSTACK_GATEWAY_UPSTREAM_KEY"  # the engine's key, kept off the command line


@contextlib.contextmanager
def gateway(
    upstream: Any,
    config: Any,
    log_dir: Path,
    variants: list[dict] | None = None,
    name: str = "",
) -> Iterator[Any]:
    """Start the gateway in front of `upstream` (an Endpoint); yield the gateway's Endpoint,
    whose model is `name` (the engine's own name when empty). With `variants`
    (serving/ab.py) it splits completions between them instead.

    The trace store is `config.trace.path`, or `<log_dir>/traces.sqlite`. The gateway
    process is always stopped, and its buffered traces written, on the way out.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    trace = getattr(config, "trace", None)
    db = Path(trace.path) if trace is not None and trace.path else log_dir / TRACE_DB_NAME
    host = "127.0.0.1"
    port = free_port(host)
    served = dict(getattr(upstream, "served", None) or {})
    command = [
        sys.executable,
        "-m",
        "lmstack.serving.gateway",
        f"--upstream={upstream.base_url}",
        f"--trace-db={db}",
        f"--host={host}",
        f"--port={port}",
        f"--engine={getattr(upstream, 'engine', '')}",
        f"--served={json.dumps(served, default=str)}",
        f"--served-name={name or upstream.model}",
        f"--upstream-model={upstream.model}",
    ]
    if trace is not None:
        command += [f"--redaction={trace.redaction}", f"--retry-s={trace.retry_s}"]
        if trace.otlp_endpoint:
            command.append(f"--otlp-endpoint={trace.otlp_endpoint}")
    limits = getattr(getattr(config, "serving", None), "limits", None)
    if limits is not None:
        fields = dataclasses.asdict(limits) if dataclasses.is_dataclass(limits) else dict(limits)
        command.append(f"--limits={json.dumps(fields)}")
    ab_cfg = getattr(getattr(config, "serving", None), "ab", None)
    if ab_cfg is not None:  # the user id is recorded with or without an A/B test
        command.append(f"--user-header={ab_cfg.user_header}")
    if variants:
        command += [f"--variants={json.dumps(variants, default=str)}"]
        command.append(f"--ab-seed={config.serving.ab.seed}")
    env = {UPSTREAM_KEY_ENV: getattr(upstream, "api_key", "") or ""}
    log_path = log_dir / "gateway.log"
    timeout_s = float(getattr(getattr(config, "serving", None), "startup_timeout_s", 60.0))
    process = start_process(command, log_path, env)
    try:
        base = f"http://{host}:{port}"
        wait_until_healthy(process, f"{base}/health", timeout_s, log_path, what="the gateway")
        log.info("gateway %s/v1 -> %s (traces: %s)", base, upstream.base_url, db)
        yield replace(upstream, base_url=f"{base}/v1", model=name or upstream.model)
    finally:
        stop_process(process)
