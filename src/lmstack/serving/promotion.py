"""Promotion on evidence: an A/B test judged by a rule registered before its traffic started.

- Registration (serve, at start): `serving.ab.promotion` is written beside the trace store as
  ab_promotion_rule.json, with the variants and the time. A later serve on the same store with
  another rule is refused (changing the rule after seeing data is how false wins are made);
  phase=report judges by the stored copy, never by its own config.
- Judgement (phase=report, promotion.json): each variant against the control (the first), on
  the rule's metric per request, in the order the values arrived.
  - peek=false: the fixed-horizon test, one look at exactly the first min_samples_per_arm
    values of each arm (the pooled two-proportion z-test for 0/1 metrics, Welch's z for
    scores), however much more traffic came since: re-running the report cannot re-test.
  - peek=true: the mSPRT (lmstack.util.stats), looked at after every value from
    min_samples_per_arm on, stopping at its first crossing; valid under continuous monitoring.
  Two-sided at alpha, Bonferroni-split between the variants; a variant is promoted when it is
  significantly better and passes the latency and cost guards. Intervals: Newcombe's for a
  difference of rates (Wilson's per arm), normal for scores, the confidence sequence for mSPRT.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmstack.config.groups.serving import PromotionConfig
from lmstack.errors import ConfigError
from lmstack.serving import monitors
from lmstack.util import stats

RULE_FILE_NAME = "ab_promotion_rule.json"
BINARY_METRICS = ("thumbs_up_rate", "format_rate")
PROMOTE, KEEP, UNDECIDED = "promote", "keep", "no decision yet"
FIXED_TEST = "fixed horizon: {} at n = {} per arm, two-sided"
SEQUENTIAL_TEST = (
    "mSPRT, normal mixture with tau = min_effect (Johari et al., Always Valid Inference, 2022), "
    "looked at after every value"
)

# ---------------------------------------------------------------- registration (serve)


def register_rule(rule: PromotionConfig, variants: list[str], folder: Path) -> Path:
    """Writes the rule beside the trace store, once; the same rule again is a no-op (a
    restarted serve), another one is refused, naming the file."""
    path = folder / RULE_FILE_NAME
    body = {"rule": asdict(rule), "control": variants[0], "variants": variants}
    if path.is_file():
        registered = json.loads(path.read_text())
        if {k: registered.get(k) for k in body} != body:
            raise ConfigError(
                f"serving.ab.promotion: {path} registered another rule or variants at "
                f"{registered.get('registered_at')} for this trace store: {registered['rule']}. "
                "A rule changed after traffic started is not pre-registered; point trace.path "
                "at a new store for a new test"
            )
        return path
    folder.mkdir(parents=True, exist_ok=True)
    registered_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(json.dumps(body | {"registered_at": registered_at}, indent=1))
    return path


def read_rule(dbs: list[Path]) -> dict[str, Any] | None:
    """The registered rule beside the stores (None for a store from before rules)."""
    for db in dbs:
        path = db.parent / RULE_FILE_NAME
        if path.is_file():
            return json.loads(path.read_text()) | {"file": str(path)}
    return None


# ---------------------------------------------------------------- the values per arm


def arm_values(
    rows: list[dict[str, Any]], feedback: list[dict[str, Any]], metric: str, monitor: Any
) -> dict[str, list[tuple[float, float]]]:
    """variant -> [(time, value)] in arrival order: the latest feedback on each request
    (thumbs as 1/0, or its score), or each answer's format verdict."""
    values: dict[str, list[tuple[float, float]]] = {}
    if metric == "format_rate":
        if monitor.format == "none":
            raise ConfigError(
                "serving.ab.promotion.metric=format_rate: the report's monitor.format is none; "
                "set monitor.format (json or regex) to judge answers by their format"
            )
        refusals = [re.compile(p, re.IGNORECASE) for p in monitor.refusal_patterns]
        for row in rows:
            verdict = monitors.check(row, monitor, refusals)["compliant"]
            if row.get("variant") and verdict is not None:
                values.setdefault(row["variant"], []).append((row["time"], float(verdict)))
        return values
    variant_of = {row["request_id"]: row.get("variant") for row in rows}
    latest = {entry["request_id"]: entry for entry in feedback}
    field = "thumbs" if metric == "thumbs_up_rate" else "score"
    for entry in sorted(latest.values(), key=lambda entry: entry["time"]):
        variant = variant_of.get(entry["request_id"])
        if variant and entry[field] is not None:
            values.setdefault(variant, []).append((entry["time"], float(entry[field])))
    return values


# ---------------------------------------------------------------- the tests


def fixed_horizon(
    control: list[float], treatment: list[float], rule: PromotionConfig, binary: bool, alpha: float
) -> dict[str, Any]:
    """One look at the first min_samples_per_arm values of each arm."""
    n = rule.min_samples_per_arm
    name = "pooled two-proportion z" if binary else "Welch z"
    result: dict[str, Any] = {
        "test": FIXED_TEST.format(name, n),
        "have": [len(control), len(treatment)],
    }
    if min(len(control), len(treatment)) < n:
        return result | {"decision": UNDECIDED, "reason": f"fewer than {n} values in an arm"}
    control, treatment = control[:n], treatment[:n]
    effect = sum(treatment) / n - sum(control) / n
    confidence = 1 - alpha
    if binary:
        z = stats.pooled_proportion_z((sum(control), n), (sum(treatment), n))
        low, high = stats.newcombe_interval((sum(control), n), (sum(treatment), n), confidence)
    else:
        _, se = stats.welch_z(control, treatment) or (effect, 0.0)
        z = effect / se if se > 0 else None
        half = stats.z_quantile(1 - alpha / 2) * se
        low, high = effect - half, effect + half
    p = 1.0 if z is None else 2 * stats.upper_tail(abs(z))
    better = p < alpha and effect > 0
    return result | {
        "control_mean": sum(control) / n,
        "treatment_mean": sum(treatment) / n,
        "effect": effect,
        "ci": [low, high],
        "p": p,
        "decision": PROMOTE if better else KEEP,
        "reason": verdict_reason(p < alpha, effect),
    }


def verdict_reason(significant: bool, effect: float) -> str:
    if not significant:
        return "no significant difference"
    return "significantly better" if effect > 0 else "significantly worse"


class RunningArm:
    """Count, sum and sum of squares of one arm's values so far."""

    def __init__(self) -> None:
        self.n, self.total, self.squares = 0, 0.0, 0.0

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value
        self.squares += value * value

    @property
    def mean(self) -> float:
        return self.total / self.n

    def variance_of_mean(self, binary: bool) -> float:
        if binary:  # the rate smoothed by one success and one failure: never a zero variance
            smoothed = (self.total + 1) / (self.n + 2)
            return smoothed * (1 - smoothed) / self.n
        sample = (self.squares - self.n * self.mean**2) / (self.n - 1)
        return max(sample, 0.0) / self.n


def sequential(
    events: list[tuple[int, float]], rule: PromotionConfig, binary: bool, alpha: float
) -> dict[str, Any]:
    """The mSPRT over (arm, value) events in arrival order (arm 0: control, 1: treatment),
    looked at after each one once both arms hold min_samples_per_arm; stops at the first
    crossing of 1/alpha, or when both arms reach max_samples_per_arm."""
    arms = (RunningArm(), RunningArm())
    mixing = rule.min_effect**2
    threshold = math.log(1 / alpha)
    best, looks, last = -math.inf, 0, None
    for arm, value in events:
        arms[arm].add(value)
        control, treatment = arms
        if min(control.n, treatment.n) < rule.min_samples_per_arm:
            continue
        variance = control.variance_of_mean(binary) + treatment.variance_of_mean(binary)
        if variance <= 0:
            continue
        looks += 1
        effect = treatment.mean - control.mean
        log_ratio = stats.msprt_log_ratio(effect, variance, mixing)
        best = max(best, log_ratio)
        last = (effect, variance, control, treatment)
        if log_ratio >= threshold or min(control.n, treatment.n) >= rule.max_samples_per_arm:
            break
    result: dict[str, Any] = {"test": SEQUENTIAL_TEST, "looks": looks, "have": [a.n for a in arms]}
    if last is None:
        return result | {"decision": UNDECIDED, "reason": "no look yet (min_samples_per_arm)"}
    effect, variance, control, treatment = last
    half = stats.msprt_half_width(variance, mixing, alpha)
    crossed = best >= threshold
    result |= {
        "stopped_at": [control.n, treatment.n],
        "control_mean": control.mean,
        "treatment_mean": treatment.mean,
        "effect": effect,
        "ci": [effect - half, effect + half],
        "e_value": math.exp(min(best, 700.0)),
        "p": min(1.0, math.exp(-best)),  # always valid: 1 / the largest ratio seen
    }
    if crossed:
        decision = PROMOTE if effect > 0 else KEEP
        return result | {"decision": decision, "reason": verdict_reason(True, effect)}
    if min(control.n, treatment.n) >= rule.max_samples_per_arm:
        return result | {"decision": KEEP, "reason": "no crossing by max_samples_per_arm"}
    return result | {"decision": UNDECIDED, "reason": "no crossing yet"}


def merged_events(
    control: list[tuple[float, float]], treatment: list[tuple[float, float]]
) -> list[tuple[int, float]]:
    tagged = [(t, 0, v) for t, v in control] + [(t, 1, v) for t, v in treatment]
    return [(arm, value) for _, arm, value in sorted(tagged, key=lambda e: (e[0], e[1]))]


# ---------------------------------------------------------------- guards and the decision


def guard_failures(
    rule: PromotionConfig, figures: dict[str, dict[str, Any]], control: str, variant: str
) -> list[str]:
    """The guards this variant breaks against the control (p90 latency, median cost)."""
    failures = []
    for limit, key, what in (
        (rule.max_latency_ratio, "latency_ms_p90", "p90 latency"),
        (rule.max_cost_ratio, "cost_usd_p50", "median cost"),
    ):
        mine, theirs = figures[variant].get(key), figures[control].get(key)
        if limit is None or not mine or not theirs:
            continue
        if mine / theirs > limit:
            failures.append(f"{what} {mine / theirs:.2f}x the control's (limit {limit}x)")
    return failures


def judge(
    registered: dict[str, Any],
    rows: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    table: list[dict[str, Any]],
    monitor: Any,
) -> dict[str, Any]:
    """promotion.json: each variant against the control, and the verdict."""
    rule = PromotionConfig(**registered["rule"])
    control = registered["control"]
    values = arm_values(rows, feedback, rule.metric, monitor)
    figures = {row["variant"]: row for row in table}
    treatments = [name for name in registered["variants"] if name != control]
    alpha = rule.alpha / len(treatments)  # Bonferroni between the variants
    binary = rule.metric in BINARY_METRICS
    compared = []
    for name in treatments:
        mine, theirs = values.get(name, []), values.get(control, [])
        if rule.peek:
            result = sequential(merged_events(theirs, mine), rule, binary, alpha)
        else:
            result = fixed_horizon(
                [v for _, v in theirs], [v for _, v in mine], rule, binary, alpha
            )
        failures = guard_failures(rule, figures, control, name) if name in figures else []
        if result["decision"] == PROMOTE and failures:
            result |= {"decision": KEEP, "reason": "better, but " + "; ".join(failures)}
        compared.append({"variant": name, "control": control, **result, "guards": failures})
    return verdict(compared, control) | {
        "rule": asdict(rule),
        "alpha_per_comparison": alpha,
        "power_at_min_effect": planned_power(rule, values.get(control, []), alpha, binary),
        "registered_at": registered.get("registered_at"),
        "rule_file": registered.get("file"),
        "comparisons": compared,
    }


def verdict(compared: list[dict[str, Any]], control: str) -> dict[str, Any]:
    promoted = [c for c in compared if c["decision"] == PROMOTE]
    if promoted:
        best = max(promoted, key=lambda c: c["effect"])
        chosen = {key: best[key] for key in ("effect", "ci", "p")}
        return {"decision": PROMOTE, "winner": best["variant"], **chosen}
    if all(c["decision"] == KEEP for c in compared):
        return {"decision": KEEP, "winner": control}
    return {"decision": UNDECIDED, "winner": None}


def planned_power(
    rule: PromotionConfig, control: list[tuple[float, float]], alpha: float, binary: bool
) -> float | None:
    """The fixed-horizon test's power at min_effect, at the control's observed rate (0.5
    before any data); None for scores, whose spread the rule does not state."""
    if not binary:
        return None
    base = sum(v for _, v in control) / len(control) if control else 0.5
    base = min(max(base, 0.01), 0.99 - rule.min_effect)
    # two-sided at alpha: a better variant is found at alpha / 2 on its side
    return stats.power_two_proportions(base, rule.min_effect, rule.min_samples_per_arm, alpha / 2)


def markdown(decision: dict[str, Any]) -> str:
    rule = decision["rule"]
    lines = [
        "## A/B test: promotion",
        "",
        f"Rule registered {decision['registered_at']} ({decision['rule_file']}): "
        f"{rule['metric']}, min effect {rule['min_effect']}, alpha {rule['alpha']}, "
        f"{rule['min_samples_per_arm']} per arm, peek={rule['peek']}.",
        "",
        "| variant | control | decision | effect | CI | p | test | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in decision["comparisons"]:
        ci = row.get("ci")
        interval = f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "-"
        effect = f"{row['effect']:.3g}" if "effect" in row else "-"
        p = f"{row['p']:.3g}" if "p" in row else "-"
        cells = [row["variant"], row["control"], row["decision"], effect, interval, p]
        lines.append("| " + " | ".join([*cells, row["test"], row["reason"]]) + " |")
    winner = decision["winner"] or "none yet"
    lines += ["", f"**Decision: {decision['decision']}** (winner: {winner}).", ""]
    return "\n".join(lines)
