"""Bradley-Terry reward model: a scalar head on the base, trained on preference pairs.

The score ``r(x, y)`` is the sequence-classification head's output at the last token of
the chat ``[user: x, assistant: y]``. Training minimises ``-log sigmoid(r_chosen -
r_rejected)``; the held-out metric is pairwise accuracy ``mean(r_chosen > r_rejected)``.
A finished run is marked by ``reward_model.json`` and loads back with
:func:`load_reward_model` as a frozen :class:`RewardScorer` (PPO's and GRPO's reward).

Deferred imports, for start-up time: peft and transformers (and the lmstack modules that
load them) are imported inside the functions that need them; the CLI's input checks import
this module first.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from lmstack.data.loading import collate_padded
from lmstack.data.tokenize import encode_prompt_completion
from lmstack.errors import ConfigError
from lmstack.models.export import make_portable, save_trained
from lmstack.models.loading import (
    LoadedModel,
    attach_adapter,
    count_parameters,
    load_base,
    load_tokenizer,
    resolve_base_path,
)
from lmstack.objectives import Objective, ObjectiveSetup
from lmstack.objectives.causal_lm import TrainedModelModule
from lmstack.objectives.losses import reward_bt_loss
from lmstack.objectives.pairs import preference_setup
from lmstack.tracking.run_dir import write_json

MARKER = "reward_model.json"


def load_model(config: Any, cache_dir: str):
    """The base as ``AutoModelForSequenceClassification(num_labels=1)`` with the adapter on
    (task SEQ_CLS, so the fresh score head trains and saves with it)."""
    from transformers import AutoModelForSequenceClassification

    if config.export.merge:
        raise ConfigError(
            "export.merge: not supported for objective=reward "
            "(the adapter folder already holds the score head)"
        )
    path = resolve_base_path(config.model, cache_dir)
    tokenizer = load_tokenizer(
        path, config.model, getattr(getattr(config, "data", None), "chat_template", None)
    )
    with quiet_transformers():
        base = load_base(
            path,
            config.model,
            config.quantization,
            auto_class=AutoModelForSequenceClassification,
            num_labels=1,
        )
    # the head reads the last non-pad token of each row
    base.config.pad_token_id = tokenizer.pad_token_id
    quantized = config.quantization.name != "none"
    model = attach_adapter(base, config.adapter, quantized, task_type="SEQ_CLS")
    model.train()
    trainable, total = count_parameters(model)
    return LoadedModel(model, tokenizer, path, trainable, total)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report: the score head is new by design, not a bad load."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def setup(config: Any, loaded: Any, rows: Any) -> ObjectiveSetup:
    """Preference pairs, batched as all chosen rows then all rejected rows (one forward)."""
    module = RewardModule(loaded.model, config.objective, config.trainer.max_steps)
    return preference_setup(config, loaded, rows, module)


def sequence_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(N,)`` scalar scores of a padded batch."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return logits.squeeze(-1).float()


class RewardModule(TrainedModelModule):
    """Bradley-Terry training of the scalar head (checkpoints: adapter and score head)."""

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        chosen, rejected = sequence_scores(self.model, batch).chunk(2)
        return reward_bt_loss(chosen, rejected), chosen.numel()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        result, pairs = self.step(batch)
        self.log("train/loss", result["loss"], prog_bar=True, batch_size=pairs, sync_dist=True)
        self.log("train/accuracy", result["accuracy"], batch_size=pairs, sync_dist=True)
        self.log("train/margin", result["margin"], batch_size=pairs, sync_dist=True)
        return result["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        result, pairs = self.step(batch)
        self.log("val/loss", result["loss"], prog_bar=True, batch_size=pairs)
        self.log("val/accuracy", result["accuracy"], batch_size=pairs)
        self.log("val/margin", result["margin"], batch_size=pairs)


def save(setup: Any, loaded: Any, config: Any, run_dir: Path) -> None:
    """adapter/ (LoRA and score head, PEFT format) or model/, then the reward_model.json
    marker that :func:`load_reward_model` checks for."""

    adapter = config.adapter.name != "none"
    folder = save_trained(loaded.model, loaded.tokenizer, run_dir, adapter=adapter)
    if adapter:
        make_portable(folder, config.model, loaded.base_path, config.paths.cache_dir)
    base = Path(loaded.base_path)
    write_json(
        run_dir / MARKER,
        {
            "objective": "reward",
            "base_path": str(base.resolve()) if base.exists() else loaded.base_path,
            "weights": folder.name,
            "dtype": config.model.dtype,
            "max_length": config.data.max_length,
        },
    )


class RewardScorer(torch.nn.Module):
    """A frozen reward model that scores (prompt, completion) pairs."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eval()

    def train(self, mode: bool = True):
        # a fixed function: no dropout, whatever a parent module asks
        return super().train(False)

    @torch.no_grad()
    def score(
        self, prompts: list[str], completions: list[str], batch_size: int = 32
    ) -> torch.Tensor:
        """``(N,)`` float32 scores, each of the chat ``[user: prompt, assistant: completion]``
        rendered with the run's own chat template, as in training; on the model's device."""

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        device = next(self.model.parameters()).device
        examples = [
            encode_prompt_completion(prompt, completion, self.tokenizer, self.max_length)
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        scores = []
        for start in range(0, len(examples), batch_size):
            batch = collate_padded(
                examples[start : start + batch_size], self.tokenizer.pad_token_id
            )
            batch = {key: value.to(device) for key, value in batch.items()}
            scores.append(sequence_scores(self.model, batch))
        return torch.cat(scores) if scores else torch.zeros(0, device=device)


def load_reward_model(run_dir: str | Path, key: str = "objective.reward_model") -> RewardScorer:
    """A finished objective=reward run, frozen and in eval mode, for scoring."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = Path(run_dir)
    marker = run_dir / MARKER
    if not marker.is_file():
        raise ConfigError(f"{key}: '{run_dir}' is not a reward-model run (no {MARKER})")
    info = json.loads(marker.read_text())
    weights = run_dir / info["weights"]
    dtype = getattr(torch, info.get("dtype", "float32"))
    tokenizer = AutoTokenizer.from_pretrained(weights)
    full = info["weights"] != "adapter"
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            weights if full else info["base_path"], num_labels=1, dtype=dtype
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    if not full:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, weights)
    return RewardScorer(model, tokenizer, info["max_length"])


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup, load_model=load_model, save=save)
