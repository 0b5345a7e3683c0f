"""Memory plan vs measured peak: `python tests/memory_probe.py "OVERRIDES" ["OVERRIDES" ...]`.

Each argument is one config (its overrides, separated by spaces), measured in turn; prints
one JSON line for each: {"estimate": bytes, "measured": bytes, "terms": {...}}.

How the peak is measured (CPU), in two parts:

- resident: after the model is loaded and the objective set up (as phase=train does them),
  the bytes of every live torch tensor (found through the garbage collector, each storage
  counted once): weights, quantization constants, adapter, a frozen reference.
- training peak: torch's profiler with profile_memory=True records every allocation and free
  of torch's CPU allocator, in order, during a few real training steps through a Lightning
  Trainer; the highest running total is what training adds on top (activations, logits,
  gradients, optimizer states, and the transient buffers of backward).

measured = resident + training peak: tensor memory only, the thing the plan estimates (not
the Python interpreter, libraries and allocator slack that a process's RSS also holds). Run
in a fresh process per config so nothing of another run is counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def allocation_sizes(profiler) -> list[tuple[int, int]]:
    from torch._C._profiler import _EventType

    found: list[tuple[int, int]] = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            found.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return sorted(found)


def net_and_peak(profiler) -> tuple[int, int]:
    live = peak = 0
    for _, size in allocation_sizes(profiler):
        live += size
        peak = max(peak, live)
    return live, peak


def live_tensor_bytes() -> int:
    import gc

    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lmstack.config.store import register_configs
    from lmstack.launch import validate

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=overrides)
    return validate(cfg)


def measure(overrides: list[str], steps: int = 3) -> dict:
    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lmstack.data.sources import load_rows
    from lmstack.models.memory import memory_plan
    from lmstack.objectives import load_objective

    config = compose(overrides)
    cache_dir = str(Path(config.paths.cache_dir).expanduser().resolve())
    rows = load_rows(config.data, config.objective.name)
    plan = memory_plan(config, rows, cache_dir)
    # the plan's gradient checkpointing choice, as a train run's preflight applies it
    config.trainer.gradient_checkpointing = plan.checkpointing
    torch.set_num_threads(1)
    L.seed_everything(config.seed, verbose=False)
    objective = load_objective(config.objective.name)
    before = live_tensor_bytes()
    loaded = objective.load_model(config, cache_dir)
    setup = objective.setup(config, loaded, rows)
    resident = live_tensor_bytes() - before
    on_gpu = config.trainer.accelerator in ("gpu", "cuda")
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        precision=config.trainer.precision,
        gradient_clip_val=config.trainer.gradient_clip_val
        if setup.module.automatic_optimization
        else None,
    )
    if on_gpu:
        # on a GPU the allocator keeps its own books: the peak of allocated bytes over the
        # whole fit, the weights moved there included
        torch.cuda.reset_peak_memory_stats()
        trainer.fit(setup.module, setup.train_loader)
        resident, peak = 0, torch.cuda.max_memory_allocated()
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as training:
            trainer.fit(setup.module, setup.train_loader)
        _, peak = net_and_peak(training)
    return {
        "estimate": plan.total,
        "measured": resident + peak,
        "resident": resident,
        "training_peak": peak,
        "terms": plan.terms,
        "tokens_per_step": plan.tokens_per_step,
    }


if __name__ == "__main__":
    import gc

    for overrides in sys.argv[1:]:
        result = measure(overrides.split())
        print(json.dumps({"overrides": overrides, **result}), flush=True)
        gc.collect()
