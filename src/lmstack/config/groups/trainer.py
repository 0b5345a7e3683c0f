"""The `trainer` group's schema (conf/trainer/): Lightning's Trainer and the scale-out strategy."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.config.rules import require, require_choice

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
# auto (lmstack: bf16-mixed where this CPU or GPU runs bfloat16 faster, else 32-true) and
# Lightning's precision names (its short legacy ones too: 32, 16, bf16, 64); checked here so a
# typo exits 2 before anything loads, not as Lightning's ValueError after the model has
PRECISIONS = (
    "auto",
    "32-true",
    "bf16-mixed",
    "bf16-true",
    "16-mixed",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "32",
    "16",
    "bf16",
    "64",
)


FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


@dataclass
class FSDPSettings:
    """trainer.strategy=fsdp (Lightning's FSDPStrategy; CUDA GPUs only)."""

    # FULL_SHARD: weights, grads and optimizer states split across ranks (least memory);
    # SHARD_GRAD_OP: only grads and states (ZeRO-2-like); HYBRID_SHARD: full inside a node
    sharding_strategy: str = "FULL_SHARD"
    # recompute each decoder layer's activations in backward (less memory, ~30% slower)
    activation_checkpointing: bool = False
    # keep sharded weights in host memory between uses (much less GPU memory, slower)
    cpu_offload: bool = False
    # full: one consolidated checkpoint (rank zero); sharded: one file a rank (faster, large)
    state_dict_type: str = "full"


@dataclass
class DeepSpeedSettings:
    """trainer.strategy=deepspeed_stage_2/3 (where DeepSpeed is installed; CUDA only)."""

    offload_optimizer: bool = False
    offload_parameters: bool = False
    activation_checkpointing: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = 500
    max_epochs: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    precision: str = "32-true"
    accelerator: str = "auto"
    # processes per node (GPUs, or CPU processes with accelerator=cpu); data.batch_size is the
    # global batch, split evenly across devices * num_nodes
    devices: int = 1
    num_nodes: int = 1
    # auto (one device: none; several: ddp), ddp, fsdp, deepspeed_stage_2, deepspeed_stage_3
    strategy: str = "auto"
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    # memory of one device in GB for the memory plan; null = detected (GPU memory, or RAM)
    device_memory_gb: float | None = None
    # refuse a run the memory plan says will not fit (false: only print the plan)
    memory_check: bool = True
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    enable_progress_bar: bool = True
    # 0 = torch's default
    num_threads: int = 0
    # recompute activations in the backward pass: much less memory, ~30% more compute;
    # null = decided by the memory plan (models/memory.py checkpointing_choice): on for dpo
    # (two sequences per example), and where kept activations would exceed 0.25 GB and the rest
    # of the plan, or the device
    gradient_checkpointing: bool | None = None

    def __post_init__(self) -> None:
        require(
            self.max_steps > 0 or self.max_epochs > 0,
            "trainer.max_steps",
            "set trainer.max_steps or trainer.max_epochs to a positive number",
        )
        require(
            self.checkpoint_every_n_steps > 0,
            "trainer.checkpoint_every_n_steps",
            "must be positive",
        )
        require_choice(self.strategy, STRATEGIES, "trainer.strategy")
        require_choice(str(self.precision), PRECISIONS, "trainer.precision")
        require(self.devices >= 1, "trainer.devices", f"must be >= 1, got {self.devices}")
        require(self.num_nodes >= 1, "trainer.num_nodes", f"must be >= 1, got {self.num_nodes}")
        require_choice(self.fsdp.sharding_strategy, FSDP_SHARDING, "trainer.fsdp.sharding_strategy")
        require_choice(
            self.fsdp.state_dict_type, ("full", "sharded"), "trainer.fsdp.state_dict_type"
        )
        if self.device_memory_gb is not None:
            require(self.device_memory_gb > 0, "trainer.device_memory_gb", "must be > 0 or null")
