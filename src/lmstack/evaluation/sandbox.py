"""Running untrusted Python (a model's code) in an OS sandbox, not in this process.

Each run is a fresh `python -I -B program.py` inside bubblewrap (`bwrap`), with:

- namespaces (`--unshare-all`): no network (a new network namespace has only a loopback that
  nothing listens on, so a connect to the host's localhost fails), its own PID namespace,
  where the code is pid 1 (`--as-pid-1`: it cannot see or signal the host's processes, its
  parent is outside, pid 0 to it; and no bwrap init is left a zombie for the host's init to
  reap, which counted against the uid's RLIMIT_NPROC until then, so that quick runs of one
  uid failed with "Can't fork"), its own user, IPC and UTS namespaces, no nested user
  namespaces;
- the file system (`--ro-bind / /`): everything read-only, the home directory included; a
  fresh, read-only, empty `/tmp`; one writable folder, the run's scratch directory, made for
  the run and removed afterwards;
- the environment: PATH, HOME and TMPDIR (the scratch directory) and nothing else, so no key
  or token of the host reaches the code; bwrap itself starts with only these too (a bwrap
  init's environment would be readable inside, in /proc/1/environ), and `--clearenv` sets
  them again for the code;
- resource limits set before the sandbox starts (setrlimit, inherited): CPU seconds
  (RLIMIT_CPU), address space (RLIMIT_AS: a 10 GB allocation is a MemoryError), processes
  (RLIMIT_NPROC: a fork bomb gets EAGAIN), file size (RLIMIT_FSIZE: the output files too);
- a wall-clock limit: past it the sandbox's process group is killed (SIGKILL), and with it,
  through `--die-with-parent` and the PID namespace, everything the code started.

RLIMIT_NPROC does not bind root, so when this process is root the sandbox runs as an
unprivileged uid (65534, `nobody`, or the uid given, e.g. one per worker so that one
fork bomb cannot starve the others' process counts); bwrap then sets up its namespaces as
that user (unprivileged user namespaces). The interpreter is this one when that user may run
it, else the system's python3.

bwrap missing, or unable to make namespaces here: a ConfigError saying how to fix it.

Deferred imports: none needed (standard library only).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmstack.errors import ConfigError

NOBODY = 65534
# kept of each output stream (the tail: where a traceback's message is)
OUTPUT_CHARS = 4000
INSTALL_HINT = "install it: apt-get install bubblewrap (Debian/Ubuntu), dnf install bubblewrap"


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    processes: int = 32
    file_mb: int = 16


@dataclass(frozen=True)
class Outcome:
    """How a program ended: passed (exit 0), failed (any other exit) or timed out."""

    status: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def message(self) -> str:
        """The reason of a failure, as short as it can be said (a traceback's last line)."""
        if self.passed:
            return ""
        if self.status == "timed out":
            return "timed out"
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit code {self.returncode}"


def bwrap_path() -> str:
    """The bwrap executable; a ConfigError saying how to install it when there is none."""
    found = shutil.which("bwrap")
    if found is None:
        raise ConfigError(f"the code sandbox needs bubblewrap (bwrap), not found on PATH; "
                          f"{INSTALL_HINT}")  # fmt: skip
    return found


def sandbox_uid(uid: int | None) -> int | None:
    """The uid the code runs as: none to change unless this process is root."""
    if os.geteuid() != 0:
        return None
    return NOBODY if uid is None else uid


@functools.cache
def interpreter() -> str:
    """This interpreter when anyone may run it (every folder on its path searchable by all),
    else the system's python3 (a root-only pyenv under /root, say)."""
    path = Path(sys.executable).resolve()
    if all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents]):
        return str(path)
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(
        f"the code sandbox: {sys.executable} cannot be run by an unprivileged user and "
        "there is no system python3 (/usr/bin/python3); install one"
    )


def sandbox_env(scratch: Path) -> dict[str, str]:
    """The whole environment of the sandbox, bwrap's own included: bwrap's init (pid 1 in the
    namespace) keeps the environment bwrap was started with, and the code can read it in
    /proc/1/environ, so `--clearenv` alone would leak this process's secrets."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }


def bwrap_command(scratch: Path, program: Path) -> list[str]:
    scratch_dir = str(scratch)
    env = sandbox_env(scratch)
    settings = [arg for key, value in env.items() for arg in ("--setenv", key, value)]
    return [
        bwrap_path(),
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--size", str(1 << 20), "--tmpfs", "/tmp",
        "--bind", scratch_dir, scratch_dir,
        "--remount-ro", "/tmp",
        "--chdir", scratch_dir,
        "--unshare-all", "--unshare-user", "--disable-userns",
        "--die-with-parent", "--new-session", "--as-pid-1",
        "--clearenv", *settings,
        interpreter(), "-I", "-B", str(program),
    ]  # fmt: skip


def limit_child(limits: Limits, uid: int | None, nproc: int):
    """The preexec function: a process group of its own, the rlimits, then the uid."""

    def apply() -> None:
        os.setsid()
        memory = limits.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb << 20, limits.file_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return apply


def processes_of(uid: int) -> int:
    """How many live processes this uid runs now (RLIMIT_NPROC counts them all). Zombies are
    left out: whoever they were reparented to reaps them in its own time."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
                count += state != "Z"
        except (OSError, IndexError):  # the process ended while we looked
            continue
    return count


def run_python(source: str, limits: Limits = Limits(), uid: int | None = None) -> Outcome:
    """Runs `source` as a program in the sandbox; its scratch directory is removed after."""
    run_as = sandbox_uid(uid)
    # a non-root user's own processes count against its limit too
    nproc = limits.processes + (processes_of(os.geteuid()) if run_as is None else 0)
    workdir = Path(tempfile.mkdtemp(prefix="lmstack-sandbox-"))
    try:
        scratch = workdir / "scratch"
        scratch.mkdir()
        program = scratch / "program.py"
        program.write_text(source)
        if run_as is not None:
            os.chown(workdir, run_as, run_as)
            os.chown(scratch, run_as, run_as)
            os.chown(program, run_as, run_as)
        command = bwrap_command(scratch, program)
        return execute(command, sandbox_env(scratch), workdir, limits, run_as, nproc)
    finally:
        if run_as is not None:
            wait_until_gone(run_as)
        shutil.rmtree(workdir, ignore_errors=True)


def wait_until_gone(uid: int, timeout_s: float = 5.0) -> None:
    """Waits for the sandbox uid's last processes (a fork bomb's, killed with the PID
    namespace) to be reaped, so that the next run of this uid starts with a zero count."""
    deadline = time.monotonic() + timeout_s
    while processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.01)


def execute(
    command: list[str],
    env: dict[str, str],
    workdir: Path,
    limits: Limits,
    uid: int | None,
    nproc: int,
) -> Outcome:
    """Runs the command with the limits; outputs go to files (bounded by RLIMIT_FSIZE), not
    pipes, so a program printing forever cannot fill this process's memory."""
    start = time.monotonic()
    with open(workdir / "stdout", "w+b") as out, open(workdir / "stderr", "w+b") as err:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            preexec_fn=limit_child(limits, uid, nproc),
            close_fds=True,
        )
        try:
            returncode = process.wait(timeout=limits.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(process)
            returncode, timed_out = process.wait(), True
        seconds = time.monotonic() - start
        stdout, stderr = tail(out), tail(err)
    # SIGXCPU (CPU seconds spent) is a time-out too; bwrap reports a signal as 128 + it
    if timed_out or returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        status = "timed out"
    else:
        status = "passed" if returncode == 0 else "failed"
    return Outcome(status, returncode, stdout, stderr, seconds)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended by itself meanwhile
        os.killpg(process.pid, signal.SIGKILL)


def tail(stream) -> str:
    stream.seek(0, os.SEEK_END)
    stream.seek(max(0, stream.tell() - OUTPUT_CHARS))
    return stream.read().decode("utf-8", "replace")


@functools.cache
def check_sandbox() -> None:
    """One trivial program through the sandbox: a ConfigError when bwrap is missing or cannot
    make its namespaces here (a container without user namespaces, say)."""
    bwrap_path()
    outcome = run_python("print('ok')", Limits(wall_s=20))
    if not outcome.passed or outcome.stdout.strip() != "ok":
        raise ConfigError(
            "the code sandbox (bubblewrap) cannot run here: "
            f"{outcome.message() or outcome.stdout.strip()}; it needs unprivileged user "
            "namespaces (sysctl kernel.unprivileged_userns_clone=1 or, on Ubuntu, "
            "kernel.apparmor_restrict_unprivileged_userns=0)"
        )
