"""A user's own task for the tests: turn "name=Ann age=3 item=pens" into JSON.

Nothing about it is arithmetic: the answer is a JSON object whose fields copy the prompt's
values (age as a number). Rows come as chat SFT rows ({messages}) and as held-out eval rows
({prompt, reference}), as a user would write them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lou"]
ITEMS = ["pens", "cups", "coins", "books", "shells", "keys"]
SCHEMA = json.dumps(
    {
        "type": "object",
        "required": ["name", "age", "item"],
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "item": {"type": "string"},
        },
    }
)


def task_row(rng: random.Random) -> tuple[str, dict]:
    record = {"name": rng.choice(NAMES), "age": rng.randint(1, 99), "item": rng.choice(ITEMS)}
    prompt = f"To JSON: name={record['name']} age={record['age']} item={record['item']}"
    return prompt, record


def write_rows(folder: Path, train: int = 400, held_out: int = 24, seed: int = 0):
    """(train.jsonl of chat rows, heldout.jsonl of {prompt, reference}) in `folder`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train_path, held_path = folder / "train.jsonl", folder / "heldout.jsonl"
    with open(train_path, "w") as handle:
        for _ in range(train):
            prompt, record = task_row(rng)
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": json.dumps(record)},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    with open(held_path, "w") as handle:
        for _ in range(held_out):
            prompt, record = task_row(rng)
            # the facts the answer must be grounded in (the faithfulness suite reads them)
            context = prompt.removeprefix("To JSON: ")
            row = {"prompt": prompt, "reference": record, "context": context}
            handle.write(json.dumps(row) + "\n")
    return train_path, held_path
