"""The code sandbox (lmstack.evaluation.sandbox) against hostile completions.

Each hostile completion is a HumanEval-style problem whose test passes exactly when the attack
worked (the secret was read, the socket connected, the file was written...), run by the
humaneval suite's own `run_tests`: so each must come back as a failure, and afterwards the
host must be as it was: no new file in $HOME or /tmp, no process of the sandbox left, the same
environment. A benign completion in the same batch passes, so the failures are the sandbox
blocking the attacks, not a sandbox that runs nothing.

The tests skip without bubblewrap unless LMSTACK_REQUIRE_SANDBOX=1 (as in CI), where they fail.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from lmstack.config.groups.eval_humaneval import HumanEvalConfig
from lmstack.evaluation import humaneval, sandbox

SECRET = f"lmstack-secret-{uuid.uuid4().hex}"
MARKER = f"lmstack-probe-{uuid.uuid4().hex[:12]}"
# the humaneval suite's limits, small: the time-outs (the loop, the fork bomb) take this long
OPTIONS = HumanEvalConfig(workers=2, timeout_s=4.0, memory_mb=512, max_processes=16)


@pytest.fixture(scope="module", autouse=True)
def sandbox_required(bubblewrap) -> None:
    """Every test here runs the sandbox (conftest's bubblewrap: skip or fail without it)."""


def attacks(port: int) -> dict[str, str]:
    """The body of `attack()` per case; it returns True only when the attack worked."""
    home, host_pid = str(Path.home()), os.getpid()
    return {
        "benign": """
            import os
            with open(os.path.join(os.environ["TMPDIR"], "notes.txt"), "w") as f:
                f.write("its own scratch directory is writable")
            return open(os.path.join(os.environ["TMPDIR"], "notes.txt")).read().startswith("its")
        """,
        "loops forever": """
            while True:
                pass
        """,
        "allocates 10 GB": """
            block = bytearray(10 * 1024**3)
            return len(block) > 0
        """,
        "fork-bombs": """
            import os
            children = []
            while len(children) < 1000:  # a thousand processes at once
                try:
                    pid = os.fork()
                except OSError:
                    continue
                if pid == 0:  # and every child forks on, forever
                    while True:
                        try:
                            os.fork()
                        except OSError:
                            pass
                children.append(pid)
            return True
        """,
        "writes to the home directory": f"""
            with open({home!r} + "/{MARKER}-home", "w") as f:
                f.write("x")
            return True
        """,
        "writes to /tmp": f"""
            with open("/tmp/{MARKER}-tmp", "w") as f:
                f.write("x")
            return True
        """,
        "writes beside its scratch directory": f"""
            import os
            with open(os.path.join(os.environ["TMPDIR"], "..", "{MARKER}-beside"), "w") as f:
                f.write("x")
            return True
        """,
        "opens a socket": f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
            return True
        """,
        "reads a secret": f"""
            import glob, os
            if os.environ.get("LMSTACK_TEST_SECRET"):
                return True
            for path in glob.glob("/proc/*/environ"):  # any process's environment it can see
                try:
                    if {SECRET!r}.encode() in open(path, "rb").read():
                        return True
                except OSError:
                    pass
            return False
        """,
        "kills its parent": f"""
            import os, signal
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill({host_pid}, signal.SIGKILL)  # the test process, by its host pid
            return True
        """,
        "kills every process it may": """
            import os, signal
            os.kill(-1, signal.SIGKILL)
            return True
        """,
    }


def as_problems(bodies: dict[str, str]) -> tuple[list[dict], list[list[str]]]:
    problems = [
        {
            "task_id": f"hostile/{name}",
            "prompt": "def attack():\n",
            "entry_point": "attack",
            "test": "def check(candidate):\n    assert candidate() is True\n",
        }
        for name in bodies
    ]
    completions = [
        [textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")] for body in bodies.values()
    ]
    return problems, completions


def sandbox_uids() -> set[int]:
    """The uids the suite's workers run as (when root; else this process's own)."""
    if os.geteuid() != 0:
        return set()
    return {sandbox.NOBODY - slot for slot in range(OPTIONS.workers)}


def sandbox_processes() -> list[str]:
    """Live processes of the sandbox: its uids' or any with a sandbox scratch directory on its
    command line. Zombies are left out: the host's init reaps them, nothing runs in them."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            owner = entry.stat().st_uid
        except (OSError, IndexError):  # it ended while we looked
            continue
        if state != "Z" and (owner in sandbox_uids() or "lmstack-sandbox-" in command):
            found.append(f"{entry.name} (uid {owner}): {command}")
    return found


def entries(folder: Path) -> dict[str, int]:
    """A folder's entries and their owners (other processes on this machine add their own)."""
    found = {}
    for path in folder.iterdir():
        try:
            found[path.name] = path.lstat().st_uid
        except OSError:
            continue
    return found


@pytest.fixture()
def listener():
    """A localhost TCP listener: the socket attack's target, which must see no connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def test_every_attack_fails_and_leaves_the_host_as_it_was(listener, monkeypatch):
    monkeypatch.setenv("LMSTACK_TEST_SECRET", SECRET)
    environment = dict(os.environ)
    home_before, tmp_before = entries(Path.home()), entries(Path("/tmp"))
    assert not sandbox_processes()
    bodies = attacks(listener.getsockname()[1])
    problems, completions = as_problems(bodies)

    started = time.monotonic()
    outcomes = dict(
        zip(bodies, (o for (o,) in humaneval.run_tests(problems, completions, OPTIONS)))
    )
    seconds = time.monotonic() - started

    assert outcomes.pop("benign").passed
    report = {name: (o.status, o.message()) for name, o in outcomes.items()}
    assert not any(o.passed for o in outcomes.values()), report
    # each stopped or blocked the way the sandbox means to
    assert report["loops forever"] == ("timed out", "timed out")
    assert report["fork-bombs"] == ("timed out", "timed out")
    assert "MemoryError" in report["allocates 10 GB"][1]
    for name in (
        "writes to the home directory",
        "writes to /tmp",
        "writes beside its scratch directory",
    ):
        assert report[name][1].startswith(("PermissionError", "OSError: [Errno 30]")), report[name]
    assert report["opens a socket"][1].startswith(("ConnectionRefusedError", "OSError")), report
    assert report["reads a secret"][1] == "AssertionError", report  # it found nothing
    assert report["kills its parent"][1].startswith("ProcessLookupError"), report
    assert report["kills every process it may"][0] == "failed", report
    assert SECRET not in "".join(o.stdout + o.stderr for o in outcomes.values())
    assert seconds < 30, f"the attacks took {seconds:.1f} s"

    # the host afterwards: no process, no file, the same environment, nobody connected
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_processes()
    for folder, before in ((Path.home(), home_before), (Path("/tmp"), tmp_before)):
        after = entries(folder)
        new = {name: owner for name, owner in after.items() if name not in before}
        assert not [name for name in new if MARKER in name or name.startswith("lmstack-sandbox-")]
        assert not [name for name, owner in new.items() if owner in sandbox_uids()], new
    assert not list(Path("/tmp").glob(f"lmstack-sandbox-*/**/{MARKER}*"))
    assert dict(os.environ) == environment
    with pytest.raises(BlockingIOError):
        listener.accept()
