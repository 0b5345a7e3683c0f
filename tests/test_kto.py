"""objective=kto: the loss against TRL's KTOTrainer, unpaired and paired rows, bad labels, and a
short run that separates desirable from undesirable held-out completions."""

from __future__ import annotations

import json
import random
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import FAST, assert_rejected_early, data_config, run_cli, run_one

# ---------------------------------------------------------------------------------------------
# the loss, against TRL 1.16 (KTOTrainer._compute_loss: TRL has no separate kto_loss method)


def trl_kto(policy, ref, desirable, policy_kl, ref_kl, beta, weights, loss_type):
    """TRL's loss and its gradient wrt the policy log-probs: `_compute_loss` of a KTOTrainer
    built without __init__, on a stand-in model whose completion log-probs sum to `policy`
    (width 3) and `policy_kl` (KL sequences, width 4); reference log-probs precomputed."""
    from trl.trainer.kto_trainer import KTOTrainer

    rows = len(policy)
    policy = policy.clone().requires_grad_(True)

    class StandIn:
        training = True

        def __call__(self, input_ids, **_):
            values = policy if input_ids.shape[1] == 3 else policy_kl
            width = input_ids.shape[1] - 1
            per_token = torch.zeros(rows, width, dtype=values.dtype)
            per_token = per_token.index_put(
                (torch.arange(rows), torch.zeros(rows, dtype=torch.long)), values
            )
            zeros = torch.zeros(rows, width)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

    trainer = object.__new__(KTOTrainer)
    model = StandIn()
    vars(trainer).update(
        model=model,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        loss_type=loss_type,
        calculate_KL=loss_type == "kto",
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    ones = {width: torch.ones(rows, width, dtype=torch.long) for width in (3, 4)}
    batch = {
        "label": desirable.clone(),
        "input_ids": ones[3],
        "attention_mask": ones[3],
        "completion_mask": ones[3],
        "KL_input_ids": ones[4],
        "KL_attention_mask": ones[4],
        "KL_completion_mask": ones[4],
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    loss = trainer._compute_loss(model, batch, return_outputs=False)
    loss.backward()
    return loss.detach(), policy.grad, trainer._metrics["train"]["kl"][-1]


def lmstack_kto(policy, ref, desirable, policy_kl, ref_kl, beta, weights, loss_type):
    from lmstack.objectives.losses import kto_kl_estimate, kto_loss

    policy = policy.clone().requires_grad_(True)
    kl = kto_kl_estimate(policy_kl, ref_kl)
    result = kto_loss(policy, ref, desirable, kl, beta, *weights, loss_type=loss_type)
    result["loss"].backward()
    return result["loss"].detach(), policy.grad, float(result["kl"])


LABEL_MIXES = {
    "mixed": [True, False, True, True, False, False, True, False],
    "mostly_desirable": [True, True, True, True, True, True, False, True],
    "all_desirable": [True] * 6,
    "all_undesirable": [False] * 5,
}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33), (0.7, 2.5)])
@pytest.mark.parametrize("mix", list(LABEL_MIXES))
def test_loss_and_gradient_match_trl(loss_type, beta, weights, mix):
    case = zlib.crc32(repr((loss_type, beta, weights, mix)).encode())
    generator = torch.Generator().manual_seed(case)
    desirable = torch.tensor(LABEL_MIXES[mix])
    rows = len(desirable)

    def logps(shift: float = 0.0) -> torch.Tensor:
        return -20 + shift + 6 * torch.randn(rows, generator=generator, dtype=torch.float64)

    ref, ref_kl = logps(), logps()
    # a policy drifted above and below its reference, so z0 is clamped in some draws
    for drift in (-3.0, 0.0, 3.0):
        policy, policy_kl = ref + logps(20 + drift) / 4, ref_kl + logps(20 + drift) / 4
        args = (policy, ref, desirable, policy_kl, ref_kl, beta, weights, loss_type)
        want_loss, want_grad, want_kl = trl_kto(*args)
        got_loss, got_grad, got_kl = lmstack_kto(*args)
        assert abs(float(got_loss - want_loss)) < 1e-5
        assert float((got_grad - want_grad).abs().max()) < 1e-5
        assert got_kl == pytest.approx(want_kl, abs=1e-5)


def test_kl_reference_point_is_clamped_and_carries_no_gradient():
    from lmstack.objectives.losses import kto_loss

    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref = torch.tensor([-4.0, -4.0])
    kl = torch.tensor(-2.0, requires_grad=True)
    result = kto_loss(policy, ref, torch.tensor([True, False]), kl, beta=1.0)
    assert float(result["kl"]) == 0.0  # a negative estimate is clamped to 0
    # desirable r = 1: 1 - s(1); undesirable r = -1: 1 - s(0 - (-1))
    want = (1 - torch.sigmoid(torch.tensor(1.0))) * 2 / 2
    assert float(result["loss"]) == pytest.approx(float(want))
    result["loss"].backward()
    assert kl.grad is None
    assert float(result["accuracy"]) == 1.0 and float(result["margin"]) == pytest.approx(2.0)


def test_kl_partners_are_a_cycle_without_self_pairs():
    from lmstack.objectives.kto import kl_partners

    for count in (2, 3, 10, 101):
        partners = kl_partners(count, seed=7)
        assert sorted(partners) == list(range(count))  # every completion is borrowed once
        assert all(partner != index for index, partner in enumerate(partners))
    assert kl_partners(10, seed=7) == kl_partners(10, seed=7)


# ---------------------------------------------------------------------------------------------
# data: unpaired rows (string and conversational), paired rows split, bad labels


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


UNPAIRED = [
    {"prompt": "1 + 1?", "completion": "2", "label": True},
    {"prompt": "2 + 2?", "completion": "5", "label": False},
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "3 + 3?"},
        ],
        "completion": [{"role": "assistant", "content": "6"}],
        "label": True,
    },
    {
        "prompt": [{"role": "user", "content": "4 + 4?"}],
        "completion": [{"role": "assistant", "content": "9"}],
        "label": False,
    },
]


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from lmstack.config.groups.model import ModelConfig
    from lmstack.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_base), ModelConfig())


def test_unpaired_rows_string_and_conversational_are_read(tmp_path, tokenizer):
    from lmstack.data.sources import load_rows
    from lmstack.data.tokenize import encode_prompt_completion
    from lmstack.objectives.kto import encode_unpaired, unpaired_rows

    path = write_jsonl(tmp_path / "feedback.jsonl", UNPAIRED)
    rows = load_rows(data_config(path=str(path), eval_fraction=0), "kto")
    assert rows.format == "unpaired_preference" and len(rows.train) == 4
    examples, over = encode_unpaired(unpaired_rows(rows.train, rows.format), tokenizer, 256, "drop")
    assert over == 0 and [e["desirable"] for e in examples] == [True, False, True, False]
    for row, example in zip(UNPAIRED, examples):
        # a row's own sequence is exactly its chat, as SFT and DPO encode it
        assert example["completion"] == encode_prompt_completion(
            row["prompt"], row["completion"], tokenizer, None
        )
        assert example["kl"] != example["completion"]


def test_kl_sequence_is_own_prompt_with_the_partners_completion(tokenizer):
    from lmstack.data.tokenize import encode_prompt_completion
    from lmstack.objectives.kto import encode_unpaired, kl_partners

    rows = UNPAIRED
    examples, _ = encode_unpaired(rows, tokenizer, 256, "drop", seed=3)
    for index, partner in enumerate(kl_partners(len(rows), seed=3)):
        mismatched = encode_prompt_completion(
            rows[index]["prompt"], rows[partner]["completion"], tokenizer, None
        )
        assert examples[index]["kl"] == mismatched


def test_paired_rows_are_split_into_one_desirable_and_one_undesirable(tmp_path):
    from lmstack.data.sources import load_rows
    from lmstack.objectives.kto import unpaired_rows

    pairs = [
        {"prompt": f"{a} + 1?", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(3)
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    rows = load_rows(data_config(path=str(path), eval_fraction=0), "kto")
    assert rows.format == "preference"
    split = unpaired_rows(rows.train, rows.format)
    assert [(r["prompt"], r["completion"], r["label"]) for r in split] == [
        (p["prompt"], p[side], side == "chosen") for p in pairs for side in ("chosen", "rejected")
    ]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"prompt": "5 + 5?", "completion": "10", "label": "yes"}, "'label' is str 'yes'"),
        ({"prompt": "5 + 5?", "completion": "10", "label": 1}, "'label' is int 1"),
        ({"prompt": "5 + 5?", "completion": "10"}, "row is missing label"),
    ],
)
def test_row_without_a_boolean_label_is_rejected_naming_file_line_and_key(tmp_path, bad, fragment):
    path = write_jsonl(tmp_path / "feedback.jsonl", [*UNPAIRED[:2], bad, *UNPAIRED[2:]])
    result = run_cli(
        "objective=kto", "data=jsonl", f"data.path={path}", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, f"{path}:3", fragment)


def test_rows_all_of_one_label_are_rejected_with_the_counts(tmp_path):
    rows = [row for row in UNPAIRED if row["label"]]
    path = write_jsonl(tmp_path / "thumbs_up.jsonl", rows)
    result = run_cli(
        "objective=kto", "data=jsonl", f"data.path={path}", output_dir=tmp_path, check=False
    )
    assert_rejected_early(
        result, str(path), "2 with label true, 0 with label false", "need both desirable"
    )


def test_held_out_rows_of_one_label_are_a_warning_not_an_error(tmp_path, capsys):
    """A harvest of rare thumbs up may hold out only thumbs down: still a validation loss."""
    from lmstack.data.sources import load_rows

    train = write_jsonl(tmp_path / "train.jsonl", UNPAIRED)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [r for r in UNPAIRED if not r["label"]])
    rows = load_rows(data_config(path=str(train), eval_path=str(heldout)), "kto")
    assert len(rows.eval) == 2 and len(rows.train) == len(UNPAIRED)
    assert f"{heldout}: every held-out row has the same label" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.beta=0", "objective.beta: must be > 0"),
        ("objective.undesirable_weight=0", "objective.undesirable_weight: must be > 0"),
        ("objective.loss_type=sigmoid", "objective.loss_type"),
    ],
)
def test_bad_objective_settings_are_rejected(tmp_path, override, message):
    result = run_cli("objective=kto", override, output_dir=tmp_path, check=False)
    assert_rejected_early(result, message)


def test_memory_plan_counts_the_reference_copy_unless_precomputed(tmp_path):
    path = write_jsonl(tmp_path / "feedback.jsonl", UNPAIRED * 4)
    common = ["phase=plan", "objective=kto", "adapter=none", "data=jsonl", f"data.path={path}"]
    _, plain = run_one(*common, output_dir=tmp_path / "plain")
    _, cached = run_one(*common, "objective.precompute_ref=true", output_dir=tmp_path / "cached")
    assert plain["plan/reference_model_gb"] == pytest.approx(plain["plan/weights_gb"])
    assert "plan/reference_model_gb" not in cached


# ---------------------------------------------------------------------------------------------
# a short real run: held-out desirable completions end up above undesirable ones


def unpaired_arith_file(path, count: int, seed: int):
    """Built-in task problems, each once, with its right solution (thumbs up) or a wrong one
    (thumbs down), drawn at random: unpaired, as a feedback log is."""
    from lmstack.data import arith

    rng = random.Random(seed)
    rows = []
    for problem in arith.problems(count, seed=seed, held_out=False):
        pair = arith.preference_row(problem, rng)
        label = rng.random() < 0.5
        rows.append(
            {
                "prompt": pair["prompt"],
                "completion": pair["chosen" if label else "rejected"],
                "label": label,
            }
        )
    return write_jsonl(path, rows)


KTO_RUN = [
    "objective=kto",
    "adapter=none",
    "objective.lr=2e-4",
    "trainer.max_steps=80",
    "data.batch_size=16",
    "data=jsonl",
    "data.eval_fraction=0.25",
    "verify.enabled=false",
    "logger=none",
    "trainer.num_threads=1",
    "trainer.enable_progress_bar=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kto_lifts_held_out_preference_accuracy(tmp_path, seed):
    """Full fine-tuning of tiny_base, lr 2e-4, beta 0.1, 80 steps of 16 rows, on 320 unpaired
    rows (80 held out). Held-out pairwise accuracy (desirable reward above undesirable, within
    each eval batch of 16) starts at 0.5 (policy = reference). Measured (2 shared cores, about
    55 s a seed): seed 0 0.650 (margin 0.69), seed 1 0.728 (margin 0.51); at 40 steps 0.695 and
    0.627. The assertion leaves room for noise on 80 held-out rows: +0.10."""
    path = unpaired_arith_file(tmp_path / "feedback.jsonl", 320, seed)
    _, metrics = run_one(*KTO_RUN, f"data.path={path}", f"seed={seed}", output_dir=tmp_path)
    assert metrics["val/reward_accuracy_before"] == pytest.approx(0.5), metrics
    assert metrics["val/reward_accuracy"] >= 0.5 + 0.10, metrics
    assert metrics["val/reward_margin"] > 0, metrics
    for key in ("train/loss", "train/kl", "train/reward_margin", "val/kl"):
        assert key in metrics, key


def test_kto_end_to_end_on_split_pairs_with_precomputed_reference(tmp_path):
    """The built-in task's preference pairs, split in two, with LoRA (the reference is the base
    with the adapter off) and the reference log-probs computed once before training: a run
    ends with its metrics and adapter."""
    run_dir, metrics = run_one(
        *FAST,
        "objective=kto",
        "objective.precompute_ref=true",
        f"paths.ref_logps_dir={tmp_path / 'ref'}",
        "logger=none",
        "trainer.num_threads=1",
        output_dir=tmp_path / "out",
    )
    assert metrics["data/train_examples"] == 2 * 96  # FAST's data.train_size pairs, split
    assert metrics["ref/cache_hit"] is False and metrics["ref/passes"] > 0
    for key in ("val/loss", "val/reward_accuracy", "train/loss", "train/kl", "train/logps"):
        assert key in metrics, key
    assert (run_dir / "adapter").is_dir()
