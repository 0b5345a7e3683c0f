"""How far people agree with each other: Cohen's kappa (two labellers), Krippendorff's alpha.

Labels are nominal (x, y, tie, both_bad: what each vote picked among the item's two answers).
Krippendorff's alpha takes any number of labellers and items with missing votes; items with
one vote carry no information about agreement and are left out, as the method says.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import permutations
from typing import Any

from lmstack.evaluation.judge import cohen_kappa


def krippendorff_alpha(units: list[list[str]]) -> float | None:
    """Nominal alpha = 1 - D_o / D_e over units (each: the labels it got); None when fewer
    than two units have two or more labels, or every label is the same (no variation)."""
    pairable = [labels for labels in units if len(labels) >= 2]
    coincidence: Counter[tuple[str, str]] = Counter()
    for labels in pairable:
        weight = 1 / (len(labels) - 1)
        for a, b in permutations(labels, 2):
            coincidence[(a, b)] += weight
    totals: Counter[str] = Counter()
    for (a, _), value in coincidence.items():
        totals[a] += value
    n = sum(totals.values())
    if len(pairable) < 2 or len(totals) < 2:
        return None
    observed = sum(value for (a, b), value in coincidence.items() if a != b) / n
    expected = sum(totals[a] * totals[b] for a in totals for b in totals if a != b) / (n * (n - 1))
    return 1 - observed / expected


def labeller_agreement(votes: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement between people on the items several of them voted on: Krippendorff's alpha,
    Cohen's kappa when there are exactly two labellers, the share of pairs of votes that agree,
    and how often people picked the answer shown on the left (A) among A/B votes."""
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for vote in votes:
        by_item[vote["item_id"]][vote["labeller"]] = vote["winner"]
    labellers = sorted({vote["labeller"] for vote in votes})
    shared = [labels for labels in by_item.values() if len(labels) >= 2]
    pairs = [pair for labels in shared for pair in permutations(labels.values(), 2)]
    decided = [vote["choice"] for vote in votes if vote["choice"] in ("A", "B")]
    figures: dict[str, Any] = {
        "votes": len(votes),
        "labellers": len(labellers),
        "items": len(by_item),
        "items_multi": len(shared),
        "alpha": krippendorff_alpha([list(labels.values()) for labels in by_item.values()]),
        "pair_agreement": sum(a == b for a, b in pairs) / len(pairs) if pairs else None,
        "first_position_rate": decided.count("A") / len(decided) if decided else None,
        "kappa": None,
    }
    if len(labellers) == 2:
        both = [labels for labels in shared if set(labels) == set(labellers)]
        first, second = labellers
        if both:
            figures["kappa"] = cohen_kappa(
                [labels[first] for labels in both], [labels[second] for labels in both]
            )
    return figures
