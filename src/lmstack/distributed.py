"""Training on many devices and nodes through Lightning's strategies (DDP, FSDP, DeepSpeed).

Every process runs the whole train phase (as torchrun or `srun` would start them): each loads
the model and the data, and the Trainer joins them into one process group. Rank zero alone
writes the run's records (status.json, metrics.json, the adapter, the W&B run); the others
only train.

Locally, rank zero starts the other ranks when the Trainer is first used: Lightning's
subprocess launcher, with the command of one run of this sweep point (its overrides and its
run directory), not the command line that started the sweep (Lightning's own Hydra support
re-runs `sys.argv`, which under `-m` would start the whole sweep again). Under Slurm, `srun`
starts one task a device and Lightning's SLURMEnvironment reads the ranks.

Only `os` is imported at the top: `launch.py` asks for the rank before any heavy import.

Deferred imports, for start-up time: lightning, torch and transformers (and the lmstack
modules that load them) are imported inside the functions that need them; the CLI's input
checks import this module first.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd

from lmstack.errors import ConfigError
from lmstack.tracking.run_dir import set_status

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
# strategies that shard weights across ranks (a quantized base cannot be sharded by them)
SHARDING_STRATEGIES = ("fsdp", "deepspeed_stage_3")


def process_rank() -> int:
    """This process's global rank: 0 in a single-process run, and in the one that started
    the others. Read from the environment, as Lightning's rank_zero_only does."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            if key == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
                continue
            return int(os.environ[key])
    return 0


def is_rank_zero() -> bool:
    return process_rank() == 0


def world_size(trainer_cfg: Any) -> int:
    return trainer_cfg.devices * trainer_cfg.num_nodes


def check_machine(trainer_cfg: Any) -> None:
    """What the config asks of this machine, checked before any model is loaded: the
    strategy's library and devices, and as many devices as asked for."""
    strategy, devices = trainer_cfg.strategy, trainer_cfg.devices
    accelerator = trainer_cfg.accelerator
    cuda = 0 if accelerator == "cpu" else _cuda_devices()
    on_gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and cuda > 0)
    if strategy.startswith("deepspeed"):
        _require_deepspeed(strategy, cuda if accelerator != "cpu" else 0)
    if strategy == "fsdp" and not on_gpu:
        raise ConfigError(
            f"trainer.strategy={strategy} with trainer.accelerator={accelerator}: Lightning runs "
            f"FSDP only on CUDA GPUs and this machine has {cuda}. On CPUs use "
            "trainer.strategy=ddp (every process holds the whole model); on a GPU machine set "
            "trainer.accelerator=gpu."
        )
    if on_gpu and devices > cuda:
        raise ConfigError(
            f"trainer.devices={devices} with trainer.accelerator={accelerator}: this machine has "
            f"{cuda} CUDA GPU(s). Set trainer.devices={max(cuda, 1)} or less"
            + (
                ", or trainer.accelerator=cpu to run the processes on CPU cores."
                if cuda
                else ", or trainer.accelerator=cpu with trainer.strategy=ddp."
            )
        )
    cores = os.cpu_count() or 1
    if not on_gpu and devices > cores:
        raise ConfigError(
            f"trainer.devices={devices} with trainer.accelerator={accelerator}: this machine has "
            f"{cores} CPU cores and each training process needs one. Set trainer.devices={cores} "
            "or less (the global batch, data.batch_size, stays the same), or run on more nodes "
            "with trainer.num_nodes and hydra/launcher=slurm."
        )
    if not on_gpu and trainer_cfg.precision.startswith("16"):
        raise ConfigError(
            f"trainer.precision={trainer_cfg.precision} with trainer.accelerator={accelerator}: "
            "float16 needs a CUDA GPU. On CPUs use trainer.precision=32-true (or bf16-mixed)."
        )


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def _require_deepspeed(strategy: str, cuda: int) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"trainer.strategy={strategy}: DeepSpeed is not installed "
            "(pip install deepspeed on a CUDA machine). Without it use trainer.strategy=fsdp "
            "(sharded, on GPUs) or trainer.strategy=ddp."
        )
    if cuda == 0:
        raise ConfigError(
            f"trainer.strategy={strategy} with trainer.accelerator: DeepSpeed needs CUDA GPUs "
            "and this machine has none. On CPUs use trainer.strategy=ddp with "
            "trainer.accelerator=cpu."
        )


def build_strategy(trainer_cfg: Any) -> Any:
    """Lightning's strategy object (or name) for `trainer.strategy` and its settings."""
    name = trainer_cfg.strategy
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        fsdp = trainer_cfg.fsdp
        return FSDPStrategy(
            sharding_strategy=fsdp.sharding_strategy,
            cpu_offload=fsdp.cpu_offload,
            activation_checkpointing_policy=_decoder_layers()
            if fsdp.activation_checkpointing
            else None,
            auto_wrap_policy=_decoder_layers(),
            state_dict_type=fsdp.state_dict_type,
            # peft freezes most weights: FSDP must accept mixed requires_grad in one unit
            use_orig_params=True,
        )
    if name.startswith("deepspeed"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        speed = trainer_cfg.deepspeed
        return DeepSpeedStrategy(
            stage=int(name[-1]),
            offload_optimizer=speed.offload_optimizer,
            offload_parameters=speed.offload_parameters,
            activation_checkpointing=speed.activation_checkpointing,
        )
    if name == "auto" and world_size(trainer_cfg) > 1:
        return "ddp"
    return name


def _decoder_layers() -> set[type]:
    """The transformer blocks FSDP wraps (and checkpoints) one by one."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layers: set[type] = {LlamaDecoderLayer}
    try:
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

        layers.add(Qwen2DecoderLayer)
    except ImportError:  # pragma: no cover - older transformers
        pass
    return layers


def adopt_launcher(trainer: Any, run_dir: Path) -> None:
    """Have rank zero start the other local ranks as single runs of this sweep point.

    Lightning builds its launcher when the Trainer is made; swapping it before the Trainer's
    first use is the one hook it leaves (its Hydra command re-runs the whole sweep).
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    launcher = getattr(trainer.strategy, "_launcher", None)
    if type(launcher) is _SubprocessScriptLauncher:
        trainer.strategy._launcher = _rank_launcher_class()(
            launcher.cluster_environment, launcher.num_processes, launcher.num_nodes, run_dir
        )


def _rank_launcher_class() -> type:
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    class RankLauncher(_SubprocessScriptLauncher):
        """Starts local ranks 1.. with `rank_command`, and ends the run when any of them fails."""

        def __init__(self, environment, num_processes, num_nodes, run_dir: Path):
            super().__init__(environment, num_processes, num_nodes)
            self.run_dir = run_dir

        def launch(self, function, *args, trainer=None, **kwargs):
            # Lightning's launch, less its child watcher (watch_ranks records the failure)
            from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

            environment = self.cluster_environment
            environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
            if not environment.creates_processes_externally:
                self._call_children_scripts()
            _set_num_threads_if_needed(num_processes=self.num_processes)
            return function(*args, **kwargs)

        def _call_children_scripts(self) -> None:
            self._check_can_spawn_children()
            self.procs = []
            env = self.cluster_environment
            os.environ["MASTER_ADDR"] = env.main_address
            os.environ["MASTER_PORT"] = str(env.main_port)
            os.environ["NODE_RANK"] = str(env.node_rank())
            os.environ["LOCAL_RANK"] = str(env.local_rank())
            os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
            command, cwd = rank_command(self.run_dir)
            for local_rank in range(1, self.num_processes):
                child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
                job_name = f"hydra.job.name=rank{local_rank}"
                self.procs.append(subprocess.Popen([*command, job_name], env=child_env, cwd=cwd))
            watch_ranks(self.procs, self.run_dir)

    return RankLauncher


def join_ranks(trainer: Any, timeout_s: float = 120.0) -> None:
    """Rank zero waits for the ranks it started, so none is left when the run ends."""
    for proc in getattr(getattr(trainer.strategy, "_launcher", None), "procs", []):
        proc.wait(timeout=timeout_s)


def rank_command(run_dir: Path) -> tuple[list[str], str]:
    """`python -m lmstack <this point's overrides> hydra.run.dir=<its run dir>`: one run, never
    a sweep, in the same run directory, without its own copy of .hydra/ (a team's config folder
    reaches it through LMSTACK_CONFIG_DIR)."""

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    # a recipe outside the repository is found through the search path the command added
    overrides += [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.searchpath")]
    command = [sys.executable, "-m", "lmstack", *overrides]
    command += [f'hydra.run.dir="{run_dir.resolve()}"', "hydra.output_subdir=null"]
    return command, get_original_cwd()


def watch_ranks(procs: list[Any], run_dir: Path, period_s: float = 0.5) -> None:
    """A thread in rank zero: when another rank fails, record it, stop every rank, and exit
    with one message (the failed rank has printed its own error above)."""

    def watch() -> None:
        while True:
            time.sleep(period_s)
            codes = [proc.poll() for proc in procs]
            if all(code == 0 for code in codes):
                return
            failed = [(rank + 1, code) for rank, code in enumerate(codes) if code]
            if failed:
                stop_run(procs, run_dir, *failed[0])

    threading.Thread(target=watch, daemon=True, name="lmstack-rank-watch").start()


def lost_a_rank(error: BaseException, trainer: Any) -> bool:
    """Whether `error` is rank zero's collective failing because another rank is gone."""
    import torch.distributed as dist

    if trainer is None or trainer.world_size == 1:
        return False
    return isinstance(error, dist.DistError) or "gloo" in str(error).lower()


def stop_after_lost_rank(trainer: Any, run_dir: Path, error: BaseException) -> None:
    """One message for a run whose other rank failed, instead of rank zero's traceback."""

    procs = getattr(getattr(trainer.strategy, "_launcher", None), "procs", [])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
        time.sleep(0.1)
    failed = [(rank + 1, proc.returncode) for rank, proc in enumerate(procs) if proc.returncode]
    rank, code = failed[0] if failed else ("?", f"unknown ({str(error).splitlines()[0]})")
    stop_run(procs, run_dir, rank, code)


def stop_run(procs: list[Any], run_dir: Path, rank: Any, code: Any) -> None:
    message = (
        f"lmstack: error: training process rank {rank} exited with code {code} (its own error, "
        "if it had one, is above); every rank of the run was stopped. Fix the cause and re-run "
        "the same command: it resumes from the last checkpoint."
    )
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    set_status(run_dir, "failed", error=message)
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def gathered_weights(trainer: Any) -> dict[str, Any] | None:
    """Under a sharding strategy, the whole trained model's weights for rank zero to save
    (a collective: every rank calls it); None when every rank holds them whole already."""
    if trainer.world_size == 1 or not trainer.strategy.__class__.__name__.startswith(
        ("FSDP", "DeepSpeed")
    ):
        return None
    state = trainer.strategy.lightning_module_state_dict()
    return {key.removeprefix("model."): value for key, value in state.items()}


def all_reduce_sum(value: Any) -> Any:
    """The sum over ranks of a tensor (itself when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the process group in use, (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
