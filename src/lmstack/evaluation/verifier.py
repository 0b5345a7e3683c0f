"""Held-out verifier score: greedy answers to task prompts, checked by the task's verifier."""

from __future__ import annotations

from typing import Any

import torch

from lmstack.data import arith


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy completions of user prompts rendered with the tokenizer's chat template."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        for prompt in prompts
    ]
    was_training = model.training
    model.eval()
    try:
        return generate_batched(model, tokenizer, texts, max_new_tokens, batch_size)
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_batched(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    max_new_tokens: int,
    batch_size: int,
    add_special_tokens: bool = False,
    **sampling: Any,
) -> list[str]:
    """The new text after each of `texts`, `batch_size` rows at a time; greedy unless
    `sampling` (do_sample, temperature, top_p) says otherwise. Chat templates bring their own
    bos, hence no special tokens by default."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of each row
    answers: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(next(model.parameters()).device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **{"do_sample": False, **sampling},
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def verifier_score(
    model: Any, tokenizer: Any, problems: list[arith.Problem], max_new_tokens: int, batch_size: int
) -> dict[str, Any]:
    """Share of held-out problems answered correctly, with a few examples to show."""
    answers = generate_answers(
        model, tokenizer, [p.question for p in problems], max_new_tokens, batch_size
    )
    scores = [arith.verify(answer, p.answer) for answer, p in zip(answers, problems)]
    examples = [
        {"prompt": p.question, "answer": a, "correct": bool(s)}
        for p, a, s in list(zip(problems, answers, scores))[:3]
    ]
    return {"score": sum(scores) / max(1, len(scores)), "n": len(scores), "examples": examples}
