"""phase=train: build model -> data -> objective -> Lightning Trainer -> fit -> verify -> save.

Reads top to bottom; every step is a plain function call.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lmstack.data.sources import Rows, load_rows
from lmstack.errors import DataError
from lmstack.phases.context import RunContext
from lmstack.tracking.run_dir import finished_metrics, set_status, write_json

log = logging.getLogger(__name__)


def run(ctx: RunContext) -> dict[str, Any]:
    config, run_dir = ctx.config, ctx.run_dir
    if (done := finished_metrics(run_dir)) and not config.run.rerun:
        print(f"lmstack: {run_dir} already holds this finished run; its results:")
        print_summary(done)
        return done

    # data first: bad input fails here, before any model is loaded
    rows = load_rows(config.data, config.objective.name)

    import lightning as L
    import torch

    if config.trainer.num_threads > 0:
        torch.set_num_threads(config.trainer.num_threads)
    L.seed_everything(config.seed, verbose=False)

    from lmstack.models.loading import load_for_training

    loaded = load_for_training(config, ctx.cache_dir)
    print(
        f"lmstack: {loaded.trainable_params:,} trainable of {loaded.total_params:,} parameters "
        f"({100 * loaded.trainable_params / loaded.total_params:.2f}%)",
        flush=True,
    )
    train_examples, eval_examples = encode(rows, loaded.tokenizer, config)

    metrics: dict[str, Any] = {
        "run_id": ctx.run_id,
        "params/trainable": loaded.trainable_params,
        "params/total": loaded.total_params,
        "data/train_examples": len(train_examples),
        "data/eval_examples": len(eval_examples),
    }
    metrics |= verify(loaded, rows, config, "before")

    from lmstack.objectives import build_objective

    module = build_objective(config, loaded.model, total_steps=config.trainer.max_steps)
    trainer, logger = build_trainer(ctx)
    train_loader, eval_loader = build_loaders(
        train_examples, eval_examples, loaded.tokenizer, config
    )
    started = time.perf_counter()
    try:
        trainer.fit(module, train_dataloaders=train_loader, ckpt_path=last_checkpoint(ctx))
        metrics["train/seconds"] = round(time.perf_counter() - started, 2)
        metrics |= {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")
        }
        if eval_loader is not None:
            metrics |= {
                k: float(v)
                for k, v in trainer.validate(module, eval_loader, verbose=False)[0].items()
            }
        metrics |= verify(loaded, rows, config, "after")
        save_artifacts(loaded, config, run_dir)
        if logger:
            logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    finally:
        from lmstack.tracking.loggers import finish_logger

        finish_logger(logger)
    write_json(run_dir / "metrics.json", metrics)
    set_status(run_dir, "finished")
    print_summary(metrics)
    return metrics


def encode(rows: Rows, tokenizer: Any, config: Any) -> tuple[list[dict], list[dict]]:
    from lmstack.data.tokenize import encode_preference, encode_row, has_target

    completion_only = getattr(config.objective, "completion_only", True)
    fmt, max_length = rows.format, config.data.max_length

    def encode_all(items: list[dict]) -> list[dict]:
        if is_preference(config):
            pairs = [encode_preference(r, tokenizer, max_length) for r in items]
            # a pair whose either side lost every target token cannot be compared
            return [p for p in pairs if has_target(p["chosen"]) and has_target(p["rejected"])]
        encoded = [encode_row(r, fmt, tokenizer, max_length, completion_only) for r in items]
        return [e for e in encoded if has_target(e)]

    train = encode_all(rows.train)
    if not train:
        raise DataError(
            f"{rows.origin}: no row has a target token left after tokenisation "
            f"(data.max_length={config.data.max_length} may cut off every completion)"
        )
    return train, encode_all(rows.eval)


def is_preference(config: Any) -> bool:
    """Objectives that train on (prompt, chosen, rejected) pairs."""
    return config.objective.name == "dpo"


def build_loaders(train: list[dict], held_out: list[dict], tokenizer: Any, config: Any):
    from lmstack.data.loading import build_eval_loader, build_train_loader

    data, pad, pairs = config.data, tokenizer.pad_token_id, is_preference(config)
    train_loader = build_train_loader(
        train, data.batch_size, data.packing, config.seed, pad, data.num_workers, pairs
    )
    eval_loader = (
        build_eval_loader(held_out, data.batch_size, data.packing, pad, pairs) if held_out else None
    )
    return train_loader, eval_loader


def build_trainer(ctx: RunContext):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lmstack.tracking.loggers import build_logger

    trainer_cfg = ctx.config.trainer
    logger = build_logger(ctx.config.logger, ctx.run_dir, ctx.run_id, ctx.group, ctx.resolved)
    checkpoint = ModelCheckpoint(
        dirpath=str(ctx.run_dir / "checkpoints"),
        every_n_train_steps=trainer_cfg.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=1,
    )
    trainer = L.Trainer(
        max_steps=trainer_cfg.max_steps,
        max_epochs=trainer_cfg.max_epochs,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        precision=trainer_cfg.precision,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        gradient_clip_val=trainer_cfg.gradient_clip_val or None,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[checkpoint],
        default_root_dir=str(ctx.run_dir),
    )
    return trainer, logger


def last_checkpoint(ctx: RunContext) -> str | None:
    path = ctx.run_dir / "checkpoints" / "last.ckpt"
    if ctx.config.run.resume and path.exists() and not ctx.config.run.rerun:
        print(f"lmstack: resuming from {path}", flush=True)
        return str(path)
    return None


def verify(loaded: Any, rows: Rows, config: Any, when: str) -> dict[str, Any]:
    """Held-out verifier score of the built-in task (the demo's before/after figure)."""
    if not (config.verify.enabled and rows.problems):
        return {}
    from lmstack.evaluation.verifier import verifier_score

    problems = rows.problems[: config.verify.num_prompts]
    result = verifier_score(
        loaded.model,
        loaded.tokenizer,
        problems,
        config.verify.max_new_tokens,
        config.verify.batch_size,
    )
    print(
        f"lmstack: held-out verifier score {when} training: {result['score']:.3f} "
        f"({result['n']} problems)",
        flush=True,
    )
    for example in result["examples"][:1]:
        print(f"  e.g. {example['prompt']!r} -> {example['answer']!r}", flush=True)
    return {f"verify/score_{when}": result["score"], f"verify/examples_{when}": result["examples"]}


def save_artifacts(loaded: Any, config: Any, run_dir: Path) -> None:
    """The adapter in PEFT format (or the full model), and a merged model when asked."""
    from lmstack.models.export import save_merged, save_trained

    save_trained(loaded.model, loaded.tokenizer, run_dir, adapter=config.adapter.name != "none")
    if config.export.merge:
        save_merged(loaded, config, run_dir)


def print_summary(metrics: dict[str, Any]) -> None:
    keys = [
        k
        for k in (
            "verify/score_before",
            "verify/score_after",
            "val/loss",
            "train/loss",
            "train/seconds",
        )
        if k in metrics
    ]
    width = max((len(k) for k in keys), default=0)
    for key in keys:
        value = metrics[key]
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key}  {value}")
