"""phase=harvest: served traffic and its feedback as training rows (lmstack.serving.harvest).

    python run.py phase=harvest 'harvest.sources=[outputs/runs/serve-hf-<hash>]' \\
        'harvest.kinds=[kto,preference,sft]'

Writes, in the run directory, `<kind>.train.jsonl` and `<kind>.heldout.jsonl` per kind, and the
data card (data_card.json, data_card.md). Train on them with
`data.source=jsonl data.path=<run>/kto.train.jsonl data.eval_path=<run>/kto.heldout.jsonl`;
the training run records the card's lineage (lineage.json). Like the report, a harvest always
re-reads its sources: a store gains traffic while it serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmstack.phases.context import RunContext
from lmstack.serving.harvest import card_markdown, harvest
from lmstack.tracking.loggers import log_results
from lmstack.tracking.run_dir import set_status, write_json

CARD_NAME = "data_card.json"


def run(ctx: RunContext) -> dict[str, Any]:
    config, run_dir = ctx.config, ctx.run_dir
    result = harvest(config.harvest)
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


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Written whole to a scratch name, then renamed: a reader never sees half a file."""
    scratch = path.with_name(path.name + ".partial")
    with scratch.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    scratch.replace(path)
    return path
