"""Child server processes (engines, the gateway): start, wait until healthy, show their log,
stop with their whole process group. No lmstack layer above this is imported here.

Deferred imports, for start-up time: httpx (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from lmstack.errors import LmstackError
from lmstack.util.signals import how_it_ended

HEALTH_POLL_S = 0.25
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 20


class EngineError(LmstackError):
    """The engine could not be started or reached."""


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
                f"serving: {what} ended ({how_it_ended(process.returncode)}) before it was "
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
