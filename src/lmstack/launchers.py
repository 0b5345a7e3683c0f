"""What lmstack's Slurm launcher adds (hydra_plugins/lmstack_launchers): states, failed points.

hydra-submitit-launcher waits for each job's result in turn; a job that ends without one (killed,
out of memory, cancelled) raises there and ends the whole sweep, and where sacct has no accounting
database to ask (the local cluster of .ci/slurm_cluster.sh) it is never seen to end at all. Here
job states come from squeue when sacct cannot answer, and a point whose job ended without a result
is recorded as failed in its run directory (status.json, error.log) while the sweep goes on.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from submitit.slurm.slurm import SlurmInfoWatcher

from lmstack.launch import EXIT_BAD_INPUT
from lmstack.tracking.run_dir import finished_metrics, set_status

log = logging.getLogger(__name__)

# the states in which a Slurm job has ended for good (a requeued job goes back to PENDING)
ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


def stop_for_bad_input(message: str) -> None:
    """Exit 2 with one paragraph, as lmstack does for any input the user can fix (Hydra's
    launcher machinery would show a traceback for an exception)."""

    print(f"lmstack: error: hydra/launcher=slurm: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def check_slurm_commands() -> None:
    """sbatch and srun must be on PATH: a sweep submitted from a machine without Slurm stops
    before anything is submitted."""

    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        stop_for_bad_input(
            f"{' and '.join(missing)} not found on PATH, so there is no Slurm cluster to submit "
            "to from this machine. Run the sweep on a Slurm login node, or run its points "
            "here: drop hydra/launcher=slurm (one after another) or use hydra/launcher=joblib "
            "(in parallel)."
        )


@functools.cache
def sacct_answers() -> bool:
    """False where Slurm keeps no accounting database ("accounting storage is disabled")."""
    try:
        answer = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return answer.returncode == 0


class SqueueWatcher(SlurmInfoWatcher):
    """Job states from squeue, which keeps a finished job for MinJobAge, where sacct cannot."""

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        if command is None or sacct_answers():
            return command
        job_ids = sorted({job.split("_")[0] for job in self._registered - self._finished})
        return [
            "squeue",
            "--states=all",
            "--array",
            "--format=%i|%T|%N",
            f"--jobs={','.join(job_ids)}",
        ]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        if sacct_answers() or not text.startswith("JOBID|"):
            return super().read_info(text)
        lines = ["JobID|State|NodeList"]
        for line in text.splitlines()[1:]:
            job, state, nodes = line.split("|", 2)
            # a job that has not ended (configuring, completing, suspended...) is still running
            lines.append(f"{job}|{state if state in ENDED else 'RUNNING'}|{nodes}")
        return super().read_info("\n".join(lines))


def failed_point(job: Any, run_dir: Path, overrides: Sequence[str], error: Exception) -> JobReturn:
    """Records a point whose job ended without a result as failed; the sweep goes on."""
    message = (
        f"Slurm job {job.job_id} ended without a result (state {job.state}); "
        f"its output: {job.paths.stdout} and {job.paths.stderr}"
    )
    log.error("sweep point %s failed: %s; the other points go on", run_dir.name, message)
    if not finished_metrics(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.log").write_text(f"{message}\n\n{error}\n")
        set_status(run_dir, "failed", error=message, slurm_job=str(job.job_id))
    failed = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    # None, as lmstack's own failed points return: Optuna records the trial as failed
    failed.return_value = None
    return failed
