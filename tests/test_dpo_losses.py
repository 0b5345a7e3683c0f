"""objective=dpo's loss family (`objective.loss_type`): every loss agrees with TRL 1.16's
DPOTrainer on the same log-probabilities, alone and mixed with `objective.loss_weights`; the
config takes one name or a list, refuses bad ones by key, and a non-default loss trains."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from lmstack.config.groups.objective import DPO_LOSS_TYPES as SCHEMA_LOSS_TYPES
from lmstack.config.store import register_configs
from lmstack.launch import validate
from lmstack.objectives.losses import DPO_LOSS_TYPES, DPO_LOSSES, dpo_loss

from conftest import FAST, assert_rejected_early, run_cli, run_one

CONF = Path(__file__).resolve().parents[1] / "conf"
BETAS = (0.05, 0.1, 0.5)
PAIR_COUNTS = (1, 3, 8)
# TRL 1.16 reads label_smoothing in these (its sigmoid dropped conservative DPO's smoothing,
# which lmstack keeps: tested against the formula in test_losses.py)
SMOOTHED = {"robust": (0.0, 0.1, 0.3), "exo_pair": (1e-3, 0.1, 0.3), "aot": (0.0, 0.2)}
SMOOTHED["aot_unpaired"] = SMOOTHED["aot"]
TOLERANCE = 1e-5


def preference_batch(pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """Random float64 per-token log-probs of 2P sequences (chosen, then rejected) with
    completions of 1 to 9 tokens after a one-token prompt, and reference sequence log-probs
    near the policy's (so beta * margin stays where every loss is well conditioned)."""
    generator = torch.Generator().manual_seed(seed)
    length = 10
    lengths = torch.randint(1, length, (2 * pairs,), generator=generator)
    positions = torch.arange(length)[None, :]
    completion_mask = ((positions >= 1) & (positions <= lengths[:, None])).long()
    per_token = -3 * torch.rand(2 * pairs, length - 1, generator=generator, dtype=torch.float64)
    per_token = per_token * completion_mask[:, 1:]
    sums = per_token.sum(1)
    reference = sums + torch.randn(2 * pairs, generator=generator, dtype=torch.float64)
    return {"per_token": per_token, "completion_mask": completion_mask, "ref": reference}


def trl_loss(batch: dict, loss_type: list[str], beta: float, **options) -> torch.Tensor:
    """TRL 1.16's DPOTrainer._compute_loss on `batch`: the trainer built without __init__,
    with only the attributes that method reads, and a stand-in model that returns the batch's
    per-token log-probs (TRL's fused LM head returns those, 0 off the completion)."""
    from trl import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    weights = options.get("loss_weights")
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer.__dict__.update(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_type,
        loss_weights=weights or [1.0] * len(loss_type),
        beta=beta,
        label_smoothing=options.get("label_smoothing", 0.0),
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=options.get("discopop_tau", 0.05)),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    per_token = batch["per_token"]

    def model(**_):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    ref_chosen, ref_rejected = batch["ref"].chunk(2)
    mask = batch["completion_mask"]
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trainer._compute_loss(model, inputs, return_outputs=False)


def lmstack_loss(batch: dict, loss_type, beta: float, **options) -> torch.Tensor:
    """lmstack's dpo_loss on the same batch: summed log-probs and token counts, as DPOModule
    passes them."""
    policy_chosen, policy_rejected = batch["per_token"].sum(1).chunk(2)
    ref_chosen, ref_rejected = batch["ref"].chunk(2)
    chosen_tokens, rejected_tokens = batch["completion_mask"].sum(1).double().chunk(2)
    result = dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type=loss_type,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        **options,
    )
    return result["loss"]


def single_loss_cases():
    for loss_type in DPO_LOSS_TYPES:
        for smoothing in SMOOTHED.get(loss_type, (0.0,)):
            for beta in BETAS:
                for pairs in PAIR_COUNTS:
                    yield loss_type, beta, smoothing, pairs


@pytest.mark.parametrize(("loss_type", "beta", "label_smoothing", "pairs"), single_loss_cases())
def test_each_loss_matches_trl(loss_type, beta, label_smoothing, pairs):
    batch = preference_batch(pairs, seed=pairs * 100 + int(beta * 100))
    options = {"label_smoothing": label_smoothing}
    ours = lmstack_loss(batch, loss_type, beta, **options)
    theirs = trl_loss(batch, [loss_type], beta, **options)
    assert ours.dtype == torch.float64
    assert torch.isfinite(ours)
    assert abs(ours.item() - theirs.item()) <= TOLERANCE, (ours.item(), theirs.item())


@pytest.mark.parametrize("tau", [0.01, 0.05, 0.5])
def test_discopop_temperature_matches_trl(tau):
    batch = preference_batch(8, seed=7)
    ours = lmstack_loss(batch, "discopop", 0.1, discopop_tau=tau)
    theirs = trl_loss(batch, ["discopop"], 0.1, discopop_tau=tau)
    assert abs(ours.item() - theirs.item()) <= TOLERANCE


@pytest.mark.parametrize(
    ("loss_type", "loss_weights"),
    [
        (["sigmoid", "sft"], [1.0, 0.5]),
        (["sigmoid", "bco_pair"], None),
        (["ipo", "hinge", "apo_zero"], [0.3, 1.0, 2.0]),
        (["sigmoid_norm", "sppo_hard", "nca_pair", "aot"], [0.25, 0.5, 1.5, 1.0]),
    ],
)
@pytest.mark.parametrize("pairs", PAIR_COUNTS)
def test_weighted_mix_matches_trl(loss_type, loss_weights, pairs):
    batch = preference_batch(pairs, seed=pairs)
    ours = lmstack_loss(batch, loss_type, 0.1, loss_weights=loss_weights)
    theirs = trl_loss(batch, loss_type, 0.1, loss_weights=loss_weights)
    assert abs(ours.item() - theirs.item()) <= TOLERANCE, (ours.item(), theirs.item())


def test_gradients_match_trl():
    """The same loss has the same gradient in the per-token log-probs (TRL's leaves), at the
    completion positions (elsewhere a real model's log-probs are 0 and carry no gradient)."""
    loss_type, weights = ["sigmoid", "ipo", "sft", "discopop"], [1.0, 0.2, 0.5, 1.0]
    grads = []
    for compute in (lmstack_loss, trl_loss):
        batch = preference_batch(3, seed=11)
        batch["per_token"].requires_grad_(True)
        compute(batch, loss_type, 0.1, loss_weights=weights).backward()
        grads.append(batch["per_token"].grad * batch["completion_mask"][:, 1:])
    torch.testing.assert_close(grads[0], grads[1], atol=TOLERANCE, rtol=0)


def test_every_loss_is_in_the_table_and_the_schema():
    assert tuple(DPO_LOSSES) == DPO_LOSS_TYPES == SCHEMA_LOSS_TYPES


def test_exo_pair_needs_label_smoothing():
    batch = preference_batch(3, seed=0)
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        lmstack_loss(batch, "exo_pair", 0.1)


def test_weights_of_another_length_are_refused_by_the_function():
    with pytest.raises(ValueError, match="1 loss_weights for 2 loss types"):
        lmstack_loss(preference_batch(3, seed=0), ["sigmoid", "sft"], 0.1, loss_weights=[1.0])


# --- the config: objective.loss_type, objective.loss_weights ------------------------------


def composed_objective(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=["objective=dpo", *overrides])
    return validate(cfg).objective


def test_one_loss_type_or_a_list_from_the_command_line():
    assert composed_objective("objective.loss_type=ipo").loss_types == ["ipo"]
    mixed = composed_objective(
        "objective.loss_type=[sigmoid,sft]", "objective.loss_weights=[1.0,0.5]"
    )
    assert mixed.loss_types == ["sigmoid", "sft"]
    assert list(mixed.loss_weights) == [1.0, 0.5]
    assert composed_objective().loss_types == ["sigmoid"]


def test_weights_length_mismatch_is_rejected_by_key(tmp_path):
    result = run_cli(
        "objective=dpo",
        "objective.loss_type=[sigmoid,sft]",
        "objective.loss_weights=[1.0]",
        output_dir=tmp_path,
        check=False,
    )
    assert_rejected_early(result, "objective.loss_weights", "1 weights for the 2 loss types")


def test_unknown_loss_type_names_the_key_and_the_choices(tmp_path):
    result = run_cli(
        "objective=dpo", "objective.loss_type=[sigmoid,hinged]", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, "objective.loss_type", "'hinged'", "sigmoid, robust, ipo, hinge")


def test_exo_pair_without_label_smoothing_is_rejected_by_key(tmp_path):
    result = run_cli(
        "objective=dpo", "objective.loss_type=exo_pair", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, "objective.label_smoothing", "exo_pair needs")


@pytest.mark.e2e
def test_hinge_loss_trains(tmp_path):
    """objective.loss_type=hinge on the built-in model (LoRA, default seed): the held-out
    hinge loss starts at 1 (policy = reference, margin 0) and falls.

    Measured with 20 steps of 8 pairs: val/loss 1.0 -> 0.925 (held-out reward accuracy
    0.5 -> 0.625, last train/loss 0.60), 45 s on 2 busy cores; 6 steps gave only 0.986."""
    longer = {"trainer.max_steps": "20", "trainer.checkpoint_every_n_steps": "10"}
    args = [arg for arg in FAST if arg.split("=")[0] not in longer]
    _, metrics = run_one(
        *args,
        *(f"{key}={value}" for key, value in longer.items()),
        "objective=dpo",
        "objective.loss_type=hinge",
        "logger=none",
        "trainer.num_threads=1",
        output_dir=tmp_path,
    )
    assert metrics["val/loss_before"] == pytest.approx(1.0, abs=1e-6), metrics
    assert math.isfinite(metrics["train/loss"]), metrics
    assert metrics["val/loss"] <= 0.95, metrics  # a drop of >= 0.05 (measured 0.075)
