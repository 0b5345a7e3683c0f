"""A/B tests through the gateway: split traffic between served variants, take feedback, compare.

- Routing (`Router`, in the gateway process): each completion request goes to one variant,
  drawn by weight. With a user id header (`serving.ab.user_header`, default X-Lmstack-User)
  the draw is a hash of the id, so a user stays with one variant; without one, each request
  is drawn on its own. The trace records the variant; the answer carries it in the
  `x-lmstack-variant` header and the request id in `x-lmstack-request-id`.
- Feedback: `POST /v1/feedback {"request_id", "thumbs": "up"|"down"}` or `{"request_id",
  "score": number}` (plus an optional "comment") is stored beside the traces.
- Analysis (`variant_table`, `comparisons`, for phase=report): per variant, requests and their
  share, latency and cost percentiles, format-monitor failures, feedback rate and mean score
  with a 95% interval (Wilson's for thumbs); against the control (the first variant), the
  difference of means with its 95% interval (Newcombe's for thumbs) and a two-sided p-value (a
  two-proportion z-test for thumbs, Welch's z for scores), and a sample-ratio-mismatch check
  of the split against the weights.

The p-values hold for one look at a sample size fixed in advance. Watching them while traffic
arrives and stopping at the first p < 0.05 ("peeking") makes false wins far more likely than
5%; the report says so. The decision to promote is lmstack.serving.promotion's: a rule
registered before the traffic, with a sequential test when it is to be looked at as it arrives.

Deferred imports, for start-up time: matplotlib and numpy (and the lmstack modules that load
them) are imported inside the functions that need them; the CLI's input checks import this
module first. scipy is imported where used: it comes with another dependency, not with
lmstack.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.serving import costs, monitors
from lmstack.util import stats

USER_HEADER = "X-Lmstack-User"
VARIANT_HEADER = b"x-lmstack-variant"
REQUEST_ID_HEADER = b"x-lmstack-request-id"
AB_MODEL = "lmstack-ab"  # what clients may send as "model"; the gateway puts each variant's
PEEKING_CAVEAT = (
    "p-values and intervals assume one look at a sample size fixed before the test. Checking "
    "them as traffic arrives and stopping at the first p < 0.05 (peeking) inflates the false "
    "positive rate well above 5%: fix the number of requests in advance, or use a sequential "
    "method (serving.ab.promotion.peek=true: an always-valid mSPRT)."
)


# ---------------------------------------------------------------- routing (gateway process)


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float
    upstream: str  # the engine's …/v1 URL
    model: str  # the "model" field that engine expects
    served: dict[str, Any]


class Router:
    """Weighted choice of a variant: by a hash of the user id (sticky), else at random."""

    def __init__(self, variants: list[Variant], user_header: str = USER_HEADER, seed: int = 0):
        total = sum(variant.weight for variant in variants)
        self.variants = variants
        self.bounds = []
        running = 0.0
        for variant in variants:
            running += variant.weight / total
            self.bounds.append(running)
        self.header = user_header.lower().encode()
        self.salt = str(seed)
        self.random = random.Random(seed)

    def pick(self, user: str) -> Variant:
        unit = sticky_unit(user, self.salt) if user else self.random.random()
        index = min(bisect.bisect_right(self.bounds, unit), len(self.variants) - 1)
        return self.variants[index]


def sticky_unit(user: str, salt: str) -> float:
    """A user id as a number in [0, 1), the same every time (and in every gateway)."""
    digest = hashlib.sha256(f"{salt}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def variants_from_json(entries: list[dict[str, Any]]) -> list[Variant]:
    return [
        Variant(e["name"], float(e["weight"]), e["upstream"], e["model"], e.get("served") or {})
        for e in entries
    ]


# ---------------------------------------------------------------- feedback


class FeedbackError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_feedback(raw: bytes) -> dict[str, Any]:
    """{request_id, score, thumbs, comment} from a feedback body; FeedbackError naming the
    field when it is malformed."""

    try:
        body = json.loads(raw)
    except ValueError as error:
        raise FeedbackError(400, f"body: not JSON ({error})") from None
    if not isinstance(body, dict):
        raise FeedbackError(400, "body: must be a JSON object {request_id, thumbs or score}")
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise FeedbackError(400, "request_id: missing (the x-lmstack-request-id of the answer)")
    check_storable("request_id", request_id)
    thumbs, score = body.get("thumbs"), body.get("score")
    if thumbs is not None and thumbs not in ("up", "down"):
        raise FeedbackError(400, f"thumbs: {thumbs!r} is not 'up' or 'down'")
    if score is not None and not is_finite_number(score):
        raise FeedbackError(400, f"score: {score!r:.100} is not a finite number")
    if thumbs is None and score is None:
        raise FeedbackError(400, "thumbs or score: give one ('up'/'down', or a number)")
    comment = body.get("comment", "")
    if not isinstance(comment, str):
        raise FeedbackError(400, "comment: must be text")
    check_storable("comment", comment)
    return {
        "request_id": request_id,
        "thumbs": None if thumbs is None else int(thumbs == "up"),
        "score": float(score) if score is not None else float(thumbs == "up"),
        "comment": comment[:2000],
    }


def is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # JSON allows integers too large for a float
        return False


def check_storable(name: str, text: str) -> None:
    """JSON's \\uXXXX escapes can make a lone surrogate, which no UTF-8 store takes: refused
    here, or the feedback would be answered as recorded and then dropped by the store."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise FeedbackError(400, f"{name}: not valid Unicode (a lone surrogate escape)") from None


# ---------------------------------------------------------------- analysis (phase=report)

Z95 = 1.959963984540054


def mean_interval(
    values: list[float], binary: bool = False
) -> tuple[float | None, float | None, float | None]:
    """Mean and its 95% interval: Wilson's for 0/1 values (40 of 40 is not "[1, 1]", as the
    normal interval says at 0 and 1), the normal one for scores."""
    if not values:
        return None, None, None
    n = len(values)
    mean = sum(values) / n
    if binary:
        return (mean, *stats.wilson_interval(sum(values), n, 0.95))
    if n < 2:
        return mean, None, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = Z95 * math.sqrt(variance / n)
    return mean, mean - half, mean + half


def normal_p(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return math.erfc(abs(z) / math.sqrt(2))


def difference(control: list[float], treatment: list[float], binary: bool) -> dict[str, Any]:
    """treatment - control: the difference of means, its 95% interval, z and p. For 0/1
    values the test is the pooled two-proportion z-test and the interval Newcombe's (Wilson's
    per side, so it does not collapse at 0 and 1); otherwise Welch's z and a normal interval."""
    n1, n2 = len(control), len(treatment)
    if n1 < 2 or n2 < 2:
        return {"diff": None, "diff_ci_low": None, "diff_ci_high": None, "z": None, "p": None}
    m1, m2 = sum(control) / n1, sum(treatment) / n2
    if binary:
        sides = (sum(control), n1), (sum(treatment), n2)
        z = stats.pooled_proportion_z(*sides)
        low, high = stats.newcombe_interval(*sides, 0.95)
    else:
        _, se = stats.welch_z(control, treatment) or (0.0, 0.0)
        z = (m2 - m1) / se if se > 0 else None
        low, high = m2 - m1 - Z95 * se, m2 - m1 + Z95 * se
    return {
        "diff": m2 - m1,
        "diff_ci_low": low,
        "diff_ci_high": high,
        "z": z,
        "p": normal_p(z) if z is not None else None,
        "test": "two-proportion z" if binary else "Welch z",
    }


def sample_ratio_p(counts: list[int], weights: list[float]) -> float | None:
    """Chi-square goodness of fit of the split to the weights (a small p: the split is broken,
    a sample-ratio mismatch, and the comparison cannot be trusted)."""
    from scipy.stats import chisquare

    total, weight = sum(counts), sum(weights)
    if total == 0 or len(counts) < 2:
        return None
    expected = [total * w / weight for w in weights]
    return float(chisquare(counts, expected).pvalue)


def latest_feedback(feedback: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last feedback given on each request (a user may change their mind)."""
    return {row["request_id"]: row for row in feedback}


def variant_table(
    rows: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    cost: Any,
    monitor: Any,
    weights: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One row per variant: traffic, latency, cost, monitors, feedback."""
    import numpy as np

    given = latest_feedback(feedback)
    names = sorted({row["variant"] for row in rows if row.get("variant")})
    all_costs = dict(zip((id(r) for r in rows), costs.request_costs(rows, cost)))
    table = []
    total = sum(1 for row in rows if row.get("variant"))
    for name in names:
        mine = [row for row in rows if row.get("variant") == name]
        done = [row for row in mine if monitors.succeeded(row)]
        rated = [given[r["request_id"]] for r in mine if r["request_id"] in given]
        scores = [entry["score"] for entry in rated]
        thumbs_only = bool(rated) and all(entry["thumbs"] is not None for entry in rated)
        mean, low, high = mean_interval(scores, binary=thumbs_only)
        spent = [all_costs[id(row)] for row in mine]
        figures: dict[str, Any] = {
            "variant": name,
            "requests": len(mine),
            "share": len(mine) / total if total else None,
            "weight_share": (weights or {}).get(name),
            "errors": len(mine) - len(done),
        }
        for key, values in (
            ("latency_ms", [r["latency_ms"] for r in done]),
            ("ttft_ms", [r["ttft_ms"] for r in done if r["ttft_ms"] is not None]),
            ("cost_usd", spent),
        ):
            for q in (50, 90, 99):
                figures[f"{key}_p{q}"] = float(np.percentile(values, q)) if values else None
        checks = monitors.summarize(mine, monitor)
        figures |= {
            "format_failure_rate": None
            if checks["compliance"] is None
            else 1 - checks["compliance"],
            "refusal_rate": checks["refusal_rate"],
            "truncated_rate": checks["truncated_rate"],
            "feedback_n": len(scores),
            "feedback_rate": len(scores) / len(mine) if mine else None,
            "feedback_mean": mean,
            "feedback_ci_low": low,
            "feedback_ci_high": high,
        }
        table.append(figures)
    return table


def comparisons(
    rows: list[dict[str, Any]], feedback: list[dict[str, Any]], control: str = ""
) -> list[dict[str, Any]]:
    """Each variant against the control (the first by name unless given)."""
    given = latest_feedback(feedback)
    scores: dict[str, list[float]] = {}
    thumbs_only: dict[str, bool] = {}
    for row in rows:
        if row.get("variant") and row["request_id"] in given:
            entry = given[row["request_id"]]
            scores.setdefault(row["variant"], []).append(entry["score"])
            thumbs_only[row["variant"]] = thumbs_only.get(row["variant"], True) and (
                entry["thumbs"] is not None
            )
    names = sorted({row["variant"] for row in rows if row.get("variant")})
    if not names:
        return []
    control = control if control in names else names[0]
    result = []
    for name in names:
        if name == control:
            continue
        binary = thumbs_only.get(name, False) and thumbs_only.get(control, False)
        result.append(
            {"variant": name, "control": control}
            | difference(scores.get(control, []), scores.get(name, []), binary)
        )
    return result


# ---------------------------------------------------------------- the report's A/B section

WEIGHTS_FILE_NAME = "ab_variants.json"
SHOWN = (
    "variant", "requests", "share", "weight_share", "errors", "latency_ms_p50", "latency_ms_p90",
    "latency_ms_p99", "cost_usd_p50", "cost_usd_p99", "format_failure_rate", "feedback_n",
    "feedback_rate", "feedback_mean", "feedback_ci_low", "feedback_ci_high",
)  # fmt: skip


def write_weights(entries: list[dict[str, Any]], folder: Path) -> None:
    """The variants and their weights beside the trace store (the report's expected split)."""

    folder.mkdir(parents=True, exist_ok=True)
    keys = ("name", "weight", "upstream", "model", "mode", "source")
    kept = [{k: e.get(k) for k in keys} for e in entries]
    (folder / WEIGHTS_FILE_NAME).write_text(json.dumps(kept, indent=1))


def read_variants(dbs: list[Path]) -> list[dict[str, Any]]:
    """The variants as served, from ab_variants.json beside the stores ([] if none), in the
    configured order, so the first is the control."""
    for db in dbs:
        path = db.parent / WEIGHTS_FILE_NAME
        if path.is_file():
            return json.loads(path.read_text())
    return []


def weight_shares(entries: list[dict[str, Any]]) -> dict[str, float]:
    """name -> share of the weights, from read_variants' entries ({} for none)."""
    total = sum(e["weight"] for e in entries)
    return {e["name"]: e["weight"] / total for e in entries}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def report_markdown(
    table: list[dict[str, Any]],
    compared: list[dict[str, Any]],
    srm: float | None,
    modes: dict[str, str] | None = None,
) -> str:
    lines = ["## A/B test: per variant", ""]
    if modes:  # how the variants were served: one multi-LoRA engine, an engine each, or URLs
        served = ", ".join(f"{name}: {mode or 'own engine'}" for name, mode in modes.items())
        lines += [f"Served as: {served}.", ""]
    lines += ["| " + " | ".join(SHOWN) + " |", "|" + "---|" * len(SHOWN)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in SHOWN) + " |" for row in table]
    lines += [
        "",
        "feedback_mean: mean score (thumbs up = 1, down = 0) with its 95% interval; "
        "feedback_rate: share of requests that got feedback.",
        "",
        "## A/B test: each variant against the control",
        "",
        "| variant | control | difference | 95% CI | z | p | test |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in compared:
        interval = f"[{_cell(row['diff_ci_low'])}, {_cell(row['diff_ci_high'])}]"
        cells = [row["variant"], row["control"], _cell(row["diff"]), interval]
        cells += [_cell(row["z"]), _cell(row["p"]), row.get("test", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    if srm is not None:
        verdict = "the split is broken (sample-ratio mismatch)" if srm < 1e-3 else "as configured"
        lines += ["", f"Split against the weights: chi-square p = {srm:.3g} ({verdict})."]
    lines += ["", f"> Sequential testing: {PEEKING_CAVEAT}", ""]
    return "\n".join(lines)


def plot_feedback(table: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in table if row["feedback_mean"] is not None]
    figure, axis = plt.subplots(figsize=(7, 1.4 + 0.5 * max(len(rows), 1)))
    for index, row in enumerate(rows):
        low, high = row["feedback_ci_low"], row["feedback_ci_high"]
        error = [[row["feedback_mean"] - low], [high - row["feedback_mean"]]] if low else None
        axis.errorbar(row["feedback_mean"], index, xerr=error, fmt="o", capsize=4)
    axis.set_yticks(range(len(rows)), [f"{r['variant']} (n={r['feedback_n']})" for r in rows])
    axis.set_xlabel("mean feedback score, 95% interval")
    axis.set_title("A/B test: feedback per variant")
    axis.grid(axis="x", color="0.93")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
