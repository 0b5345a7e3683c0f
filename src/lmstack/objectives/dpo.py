"""Direct Preference Optimisation (Rafailov et al. 2023) as a LightningModule.

Each batch holds P pairs as 2P sequences (chosen ones, then rejected ones; see
`collate_preference`), packed into one padding-free row by default (`data.packing`)
or padded, and scored in one forward pass by the policy and one by the
reference. The reference is the policy with its adapter switched off when there is
one (no second copy of the base weights), else a frozen copy taken at the start.
"""

from __future__ import annotations

import fcntl
import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lmstack.data.loading import collate_preference
from lmstack.objectives import Objective, ObjectiveSetup
from lmstack.objectives.causal_lm import TrainedModelModule
from lmstack.objectives.losses import dpo_loss
from lmstack.objectives.pairs import completion_logprob_totals, preference_setup
from lmstack.objectives.reference import frozen_reference, keep_frozen_in_eval, reference_of
from lmstack.tracking.identity import stable_hash


def setup(config: Any, loaded: Any, rows: Any) -> ObjectiveSetup:
    """Preference pairs, batched as all chosen rows then all rejected rows."""
    module = DPOModule(loaded.model, config.objective, config.trainer.max_steps)

    def prepare(pairs: list[dict]) -> dict:
        if not config.objective.precompute_ref:
            return {}
        return precompute_reference(module, pairs, loaded, config)

    return preference_setup(config, loaded, rows, module, prepare, packing=config.data.packing)


def reference_cache_key(examples: list[dict], loaded: Any, config: Any) -> str:
    """What reference log-probs depend on: the reference weights (base folder and its
    quantization) and the exact token ids (data, tokenizer, template, max_length). Beta, loss
    type and seed are not in it, so a sweep over them reuses one computation (the cache holds
    summed log-probs; the length-normalised losses divide by token counts from the batch)."""

    return stable_hash(
        {
            "model": folder_fingerprint(loaded.base_path),
            "quantization": vars(config.quantization),
            "examples": stable_hash([[e["chosen"], e["rejected"]] for e in examples], 32),
        },
        24,
    )


def folder_fingerprint(path: str) -> Any:
    """Name, size and modification time of a model folder's files (a hub id as it is)."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    files = sorted(f for f in folder.iterdir() if f.is_file())
    return [str(folder.resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime) for f in files]


def precompute_reference(module: DPOModule, examples: list[dict], loaded: Any, config: Any):
    """Reference log-probs of every pair, computed once and cached on disk."""
    key = reference_cache_key(examples, loaded, config)
    compute = functools.partial(_reference_pass, module, examples, loaded, config)
    return cached_reference_logps(module, config, key, examples, compute, "pairs")


def cached_reference_logps(
    module: Any, config: Any, key: str, examples: list[dict], compute: Any, unit: str
) -> dict[str, Any]:
    """Reference log-probs of every example (DPO's pairs, KTO's rows), `compute()`d once, an
    (N, 2) tensor, and cached on disk under `key`; each example then carries its own
    (`ref_logps`), so training runs no reference forward pass."""
    cache = Path(config.paths.ref_logps_dir) / f"{key}.pt"
    cache.parent.mkdir(parents=True, exist_ok=True)
    # the ranks of a multi-process run (and concurrent sweep points) compute it once: the
    # first to take the lock computes, the others wait and read it
    with cache_lock(cache):
        hit = cache.exists()
        if hit:
            logps = torch.load(cache)
            print(f"lmstack: reference log-probs from the cache ({cache.name})", flush=True)
        else:
            logps = compute()
            torch.save(logps, cache.with_suffix(".tmp"))
            cache.with_suffix(".tmp").rename(cache)
            print(f"lmstack: reference log-probs of {len(examples)} {unit} cached", flush=True)
    for example, pair in zip(examples, logps.tolist()):
        example["ref_logps"] = pair
    return {"ref/cache_hit": hit, "ref/passes": module.reference_passes}


@contextmanager
def cache_lock(cache: Any):
    """An exclusive lock on `<cache>.lock` while held."""
    with open(cache.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reference_pass(
    module: DPOModule, examples: list[dict], loaded: Any, config: Any
) -> torch.Tensor:
    batch_size, pad = config.data.batch_size, loaded.tokenizer.pad_token_id
    parts = []
    for start in range(0, len(examples), batch_size):
        print(f"lmstack: reference log-probs {start}/{len(examples)} pairs", end="\r", flush=True)
        batch = collate_preference(
            examples[start : start + batch_size], pad, packing=config.data.packing
        )
        parts.append(torch.stack(module.reference_logps(batch), dim=1))
    return torch.cat(parts)


def completion_sequence_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool
) -> torch.Tensor:
    """``(S,)`` summed (or averaged) completion log-probs of the batch's S sequences: S padded
    rows, or the sequences packed in one row (``position_ids``). Logits are computed only at
    positions that predict a completion token (:func:`target_token_logprobs`); equal to
    `sequence_logprobs` / `packed_sequence_logprobs` of the full logits."""
    total, tokens = completion_logprob_totals(model, batch)
    return total / tokens.clamp(min=1.0) if average else total


class ReferencedModule(TrainedModelModule):
    """A policy trained against a frozen reference (DPO, KTO): the base with the adapter off,
    or a frozen copy without one (objectives/reference.py)."""

    def __init__(self, model: torch.nn.Module, objective: Any, total_steps: int):
        super().__init__(model, objective, total_steps)
        self.reference_passes = 0  # forward passes of the reference model, for the record
        self.reference = frozen_reference(model)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_in_eval(self.reference)
        return self


class DPOModule(ReferencedModule):
    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """``(chosen, rejected)`` log-probs of the completions, each ``(P,)``, summed over
        completion tokens (the length-normalised losses divide by token counts themselves);
        from 2P padded rows, or from one packed row (``position_ids`` in the batch).
        """
        return completion_sequence_logprobs(model, batch, average=False).chunk(2)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]):
        if "ref_logps" in batch:  # precomputed (objective.precompute_ref=true)
            return batch["ref_logps"].unbind(dim=1)
        self.reference_passes += 1
        with reference_of(self.model, self.reference) as reference:
            return self.sequence_logps(reference, batch)

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        ref_chosen, ref_rejected = self.reference_logps(batch)
        logps, tokens = completion_logprob_totals(self.model, batch)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.clamp(min=1.0).chunk(2)
        objective = self.objective
        result = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=objective.beta,
            loss_type=objective.loss_type,
            label_smoothing=objective.label_smoothing,
            loss_weights=getattr(objective, "loss_weights", None),
            chosen_tokens=chosen_tokens,
            rejected_tokens=rejected_tokens,
            discopop_tau=getattr(objective, "discopop_tau", 0.05),
        )
        return result, chosen.detach(), rejected.detach()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        result, chosen, rejected = self.step(batch)
        # means over the global batch: every rank holds as many pairs (data.batch_size / world)
        log = dict(batch_size=chosen.numel(), sync_dist=True)
        self.log("train/loss", result["loss"], prog_bar=True, **log)
        self.log("train/reward_margin", result["margins"].mean(), **log)
        self.log("train/reward_accuracy", result["accuracy"], **log)
        self.log("train/logps_chosen", chosen.mean(), **log)
        self.log("train/logps_rejected", rejected.mean(), **log)
        return result["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        result, chosen, _ = self.step(batch)
        pairs = chosen.numel()
        self.log("val/loss", result["loss"], prog_bar=True, batch_size=pairs)
        # a tie (policy == reference, as before training) counts half: chance is 0.5
        ties = (result["margins"] == 0).float().mean()
        self.log("val/reward_accuracy", result["accuracy"] + 0.5 * ties, batch_size=pairs)


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup)
