"""phase=harvest: served traffic and its feedback as training rows (lmstack.serving.harvest).

    python run.py phase=harvest 'harvest.sources=[outputs/runs/serve-hf-<hash>]' \\
        'harvest.kinds=[kto,preference,sft]'

Sources are trace stores (rated by users' feedback, or by harvest.scorers) and labelling
sessions (phase=label: majority votes as preference pairs). Writes, in the run directory,
`<kind>.train.jsonl` and `<kind>.heldout.jsonl` per kind, and the data card (data_card.json,
data_card.md). Train on them with `data.source=jsonl data.path=<run>/kto.train.jsonl
data.eval_path=<run>/kto.heldout.jsonl`; the training run records the card's lineage
(lineage.json). Like the report, a harvest always re-reads its sources: a store gains traffic
while it serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.evaluation import votes
from lmstack.phases.context import RunContext
from lmstack.serving.harvest import Voted, card_markdown, harvest
from lmstack.tracking.loggers import log_results
from lmstack.tracking.run_dir import set_status, write_json

CARD_NAME = "data_card.json"


def run(ctx: RunContext) -> dict[str, Any]:
    config, run_dir = ctx.config, ctx.run_dir
    sessions = [source for source in config.harvest.sources if votes.is_session(source)]
    stores = [source for source in config.harvest.sources if source not in sessions]
    voted = [pair for session in sessions for pair in voted_pairs(session)]
    score = build_score(config.harvest) if config.harvest.scorers else None
    result = harvest(config.harvest, stores, score, voted)
    written = []
    for kind, parts in result.rows.items():
        for part, rows in parts.items():
            written.append(write_jsonl(run_dir / f"{kind}.{part}.jsonl", rows))
    write_json(run_dir / CARD_NAME, result.card)
    markdown = card_markdown(result.card)
    (run_dir / "data_card.md").write_text(markdown)
    metrics: dict[str, Any] = {
        "harvest/train_rows": sum(parts["train"] for parts in result.card["rows"].values()),
        "harvest/rated_requests": result.card["rated_requests"],
        "harvest/files": [str(path) for path in written],
    }
    for kind, counts in result.card["rows"].items():
        for part, count in counts.items():
            metrics[f"harvest/{kind}/{part}_rows"] = count
        if not counts["train"]:
            print(
                f"lmstack: harvest: warning: no {kind} rows to train on (left out: "
                f"{result.card['left_out']}); see data_card.md",
                flush=True,
            )
    log_results(ctx, metrics)
    write_json(run_dir / "metrics.json", metrics)
    set_status(run_dir, "finished")
    print(markdown)
    return metrics


def voted_pairs(session_path: str) -> list[Voted]:
    """A labelling session's items with a majority (x or y; a tie or both-bad has none)."""
    key = f"harvest.sources ({session_path})"
    session = votes.open_session(session_path, key)
    winners: dict[str, list[str]] = {}
    for vote in session.votes:
        winners.setdefault(vote["item_id"], []).append(vote["winner"])
    pairs = []
    for item_id, item_winners in winners.items():
        item, majority = session.items[item_id], votes.majority_label(item_winners)
        if majority == "tie":
            continue
        chosen, rejected = (item.x, item.y) if majority == "x" else (item.y, item.x)
        pairs.append(Voted(item.prompt, chosen, rejected, len(item_winners), str(session.source)))
    return pairs


def build_score(harvest_cfg: Any):
    """harvest.scorers as one function of (prompts, responses): their weighted sum, each prompt's
    reference (harvest.references) given to the scorers that compare with one."""
    from lmstack.objectives.reward_functions import build_reward_functions

    functions = build_reward_functions(harvest_cfg.scorers, key="harvest.scorers")
    references = read_references(harvest_cfg.references) if harvest_cfg.references else {}

    def score(prompts: list[Any], responses: list[str]) -> list[float]:
        texts = [prompt_text(prompt) for prompt in prompts]
        answers = [references.get(prompt_key(prompt)) for prompt in prompts]
        total = [0.0] * len(responses)
        for function in functions:
            values = function.score(texts, responses, answers)
            total = [t + function.weight * v for t, v in zip(total, values, strict=True)]
        return total

    return score


def prompt_key(prompt: Any) -> str:
    """A prompt as the trace keeps it (text, or chat messages' roles and contents)."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps([[m["role"], m.get("content") or ""] for m in prompt], ensure_ascii=False)


def prompt_text(prompt: Any) -> str:
    """What a scorer or judge reads as the question: the text, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content") or "" for m in prompt if m["role"] == "user"]
    return users[-1] if users else ""


def read_references(path: str) -> dict[str, str]:
    """harvest.references: {prompt or messages, answer} rows, by the prompt's key."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"harvest.references: no file '{path}'")
    found = {}
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["messages"] if "messages" in row else row["prompt"]
            found[prompt_key(prompt)] = str(row["answer"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                f"{path}:{number}: a reference row needs 'prompt' (or 'messages') and 'answer'"
            ) from None
    return found


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Written whole to a scratch name, then renamed: a reader never sees half a file."""
    scratch = path.with_name(path.name + ".partial")
    with scratch.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    scratch.replace(path)
    return path
