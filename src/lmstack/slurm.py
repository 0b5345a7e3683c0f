"""Training under Slurm: the Trainer's cluster plugin, and checkpoint-then-requeue on a signal.

Slurm asks a running job to leave in two ways:

- the requeue signal (USR2, what submitit asks for with `#SBATCH --signal=USR2@<signal_delay_s>`):
  sent before the time limit, or by hand with `scancel --signal=USR2 <jobid>`. The job is
  expected to save its state and requeue itself; submitit's handler does the requeueing.
- SIGTERM (then SIGKILL after KillWait): the job is preempted, cancelled, or requeued from
  outside with `scontrol requeue <jobid>`. Slurm decides whether it comes back.

Either way the training loop finishes the step it is in, saves `checkpoints/last.ckpt` (the
file a re-run of the same config resumes from, see phases/train.py) and leaves without a
result, so submitit's launcher keeps waiting for the requeued job, which resumes from it.

Lightning's own SLURMEnvironment(auto_requeue=True) is turned off on purpose: it saves
`hpc_ckpt_N.ckpt` from inside the signal handler (mid-step) in the run directory, where
lmstack does not resume from, and it never sees submitit's USR2 (a handler already sits there).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from lmstack.tracking.run_dir import set_status

# exit status of a step that left for a requeue; Slurm reruns the job, the status is unused
REQUEUE_EXIT = 255
SIGTERM_EXIT = 128 + signal.SIGTERM


def under_slurm() -> bool:
    """A Slurm job step (sbatch + srun, as submitit runs it), not an interactive allocation."""
    return SLURMEnvironment.detect()


def requeue_signal() -> signal.Signals:
    """The signal Slurm sends before the time limit: submitit's (SUBMITIT_PREEMPT_SIGNAL)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}")


def trainer_plugins() -> list[Any]:
    """Under Slurm, the cluster environment without Lightning's own auto-requeue."""
    return [SLURMEnvironment(auto_requeue=False)] if under_slurm() else []


def trainer_callbacks(run_dir: Path) -> list[Callback]:
    return [RequeueOnSignal(run_dir)] if under_slurm() else []


class RequeueOnSignal(Callback):
    """On the requeue signal or SIGTERM: save last.ckpt at the next step boundary, then leave.

    Saving at a step boundary (where ModelCheckpoint saves too) rather than in the signal
    handler keeps the checkpoint consistent, so the resumed run ends where an uninterrupted
    one does.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.checkpoint = run_dir / "checkpoints" / "last.ckpt"
        self.signal = requeue_signal()
        self._received: int | None = None
        self._previous: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._previous = signal.getsignal(self.signal)
        signal.signal(self.signal, self._note_signal)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.ckpt_path:
            print(f"lmstack: resumed at step {trainer.global_step}", flush=True)

    def _note_signal(self, signum: int, _frame: Any) -> None:
        # only note it: the loop acts at the next step boundary, where its state is consistent
        print(f"lmstack: received {signal.Signals(signum).name}", flush=True)
        self._received = signum

    def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
        received = self._received is not None or trainer.received_sigterm
        if trainer.world_size > 1:
            # every rank of a multi-task job leaves at the same step: the first to see the
            # signal decides for all (the save below is collective)
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        self._save(trainer)
        requeue = self._received is not None
        if trainer.world_size > 1:
            requeue = trainer.strategy.reduce_boolean_decision(requeue, all=False)
        if not requeue:
            # SIGTERM: Slurm is stopping the job and requeues it if it was preempted
            if trainer.is_global_zero:
                set_status(self.run_dir, "interrupted", step=trainer.global_step)
            raise SystemExit(SIGTERM_EXIT)
        if not trainer.is_global_zero:
            raise SystemExit(REQUEUE_EXIT)  # rank zero requeues the job, every task with it
        set_status(self.run_dir, "requeued", step=trainer.global_step)
        self._requeue()

    def _save(self, trainer: Any) -> None:
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint.with_name(self.checkpoint.name + ".partial")
        trainer.save_checkpoint(partial)  # rank zero writes it; every rank waits for that
        if not trainer.is_global_zero:
            return
        # atomic: SIGKILL after KillWait never leaves a half-written last.ckpt
        os.replace(partial, self.checkpoint)
        print(f"lmstack: saved {self.checkpoint} at step {trainer.global_step}", flush=True)

    def _requeue(self) -> None:
        """submitit's handler requeues (counting time-outs against max_num_timeout) and exits."""
        if callable(self._previous):
            self._previous(self._received, None)
        job_id = os.environ["SLURM_JOB_ID"]
        if array_job := os.environ.get("SLURM_ARRAY_JOB_ID"):
            job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        # not fatal if it fails: e.g. a pipeline's parent process has requeued the job already
        answer = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        print(f"lmstack: scontrol requeue {job_id}: {answer.stderr.strip() or 'ok'}", flush=True)
        raise SystemExit(REQUEUE_EXIT)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(self.signal, self._previous)
            self._previous = None
