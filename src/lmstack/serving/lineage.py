"""The chain behind an A/B test's variants, for phase=report: a variant trained on harvested
traffic <- its training run (lineage.json) <- the harvest and its data card <- the trace
stores and the runs that served them; drawn as one picture with the A/B verdict at its end.

    v0 served (traces, ratings) -> harvest (rows per kind) -> v1 (objective, steps) -> A/B

Only variants whose run recorded a lineage.json (trained on phase=harvest's rows) have a chain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Chain:
    """One trained variant's chain, as the report shows it."""

    variant: str
    run: str  # the variant's training run directory
    lineage: dict[str, Any]  # its lineage.json
    card: dict[str, Any]  # the harvest's data_card.json ({} when it is gone)


def chains(variants: list[dict[str, Any]]) -> list[Chain]:
    found = []
    for entry in variants:
        source = str(entry.get("source") or "")
        path = Path(source) / "lineage.json"
        if not source or not path.is_file():
            continue
        lineage = json.loads(path.read_text())
        card_path = Path(lineage["harvest_run"]) / "data_card.json"
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        found.append(Chain(entry["name"], source, lineage, card))
    return found


def served_summary(lineage: dict[str, Any]) -> str:
    return "; ".join(
        f"{s['store']} ({s['traces']} traces, {s['feedback']} ratings, served "
        f"{', '.join(s['served_runs']) or 'no lmstack run'})"
        for s in lineage.get("sources") or []
    )


def lineage_markdown(found: list[Chain]) -> str:
    """The variant <- its run <- the harvest and its rows <- the stores and the served runs."""
    lines = [
        f"- {chain.variant} <- {chain.run} ({chain.lineage.get('objective', '?')}) <- harvest "
        f"{chain.lineage['harvest_run']} (rows {chain.lineage['train_rows']}) <- "
        f"{served_summary(chain.lineage)}"
        for chain in found
    ]
    return "\n".join(["## A/B test: lineage", "", *lines, ""]) if lines else ""


# ---- the picture ----


def chain_boxes(chain: Chain, table: list[dict[str, Any]], decision: dict | None) -> list[str]:
    """The texts of the chain's four boxes, left to right."""
    sources = chain.lineage.get("sources") or []
    served = sorted({run for s in sources for run in s["served_runs"]})
    traces = sum(s["traces"] for s in sources)
    ratings = sum(s["feedback"] for s in sources)
    rows = chain.card.get("rows", {})
    kinds = "\n".join(
        f"{kind}: {n['train']} train / {n['heldout']} held out" for kind, n in rows.items()
    )
    objective = chain.lineage.get("objective", "?")
    steps = chain.lineage.get("max_steps")
    return [
        "traffic served by\n"
        + "\n".join(short(run) for run in served or ["a model, not an lmstack run"])
        + f"\n{traces} traces, {ratings} ratings",
        "harvest (data card)\n" + (kinds or "(card missing)"),
        f"{chain.variant}: {objective}"
        + (f", {steps} steps" if steps else "")
        + f"\n{short(Path(chain.run).name)}",
        verdict_box(chain.variant, table, decision),
    ]


def verdict_box(variant: str, table: list[dict[str, Any]], decision: dict | None) -> str:
    lines = ["A/B"]
    for row in table:
        rate = row.get("feedback_mean")
        shown = f"{rate:.3f}" if rate is not None else "-"
        lines.append(f"{row['variant']}: {shown} (n={row.get('feedback_n', 0)})")
    compared = [c for c in (decision or {}).get("comparisons", []) if c["variant"] == variant]
    for row in compared:
        if "effect" in row and row.get("ci"):
            low, high = row["ci"]
            lines.append(f"effect {row['effect']:+.3f} [{low:+.3f}, {high:+.3f}]")
        if "p" in row:
            lines.append(f"p = {row['p']:.3g}")
    if decision:
        lines.append(f"decision: {decision['decision']}")
    return "\n".join(lines)


def short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_chain(
    found: list[Chain], table: list[dict[str, Any]], decision: dict | None, path: Path
) -> Path:
    """served -> harvest -> trained variant -> A/B verdict, one row per trained variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(12, 2.2 * len(found)))
    axis.set_xlim(0, 4)
    axis.set_ylim(0, len(found))
    axis.axis("off")
    style = {"boxstyle": "round,pad=0.5", "facecolor": "#eef3fb", "edgecolor": "#4a6fa5"}
    for row, chain in enumerate(found):
        y = len(found) - row - 0.5
        for column, text in enumerate(chain_boxes(chain, table, decision)):
            axis.text(column + 0.45, y, text, ha="center", va="center", fontsize=8, bbox=style)
            if column:
                axis.annotate(
                    "", (column + 0.02, y), (column - 0.12, y), arrowprops={"arrowstyle": "->"}
                )
    axis.set_title("From traffic to the next model: the chain behind the A/B test")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
