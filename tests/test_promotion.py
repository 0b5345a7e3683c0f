"""The promotion rule's statistics, checked by simulation and exact enumeration (pure Python,
seeded): error rates under A/A tests with and without peeking, power at the minimum effect,
interval coverage at the edges; and the rule's registration beside a trace store."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from lmstack.config.groups.serving import PromotionConfig
from lmstack.errors import ConfigError
from lmstack.serving import ab, promotion
from lmstack.util import stats

ALPHA = 0.05
SIMULATIONS = 2000


def bernoulli(rng: random.Random, rate: float, n: int) -> list[float]:
    return [float(rng.random() < rate) for _ in range(n)]


def fixed_horizon_promotions(rule: PromotionConfig, rates: tuple[float, float], n: int, seed: int):
    """The share of SIMULATIONS fixed-horizon tests, n values per arm drawn at these rates
    (control, treatment), that promote the treatment."""
    rng = random.Random(seed)
    promoted = 0
    for _ in range(SIMULATIONS):
        control, treatment = bernoulli(rng, rates[0], n), bernoulli(rng, rates[1], n)
        result = promotion.fixed_horizon(control, treatment, rule, True, ALPHA)
        promoted += result["decision"] == promotion.PROMOTE
    return promoted / SIMULATIONS


def test_fixed_horizon_promotes_a_variant_no_better_at_most_alpha_of_the_time():
    rule = PromotionConfig(min_samples_per_arm=100, alpha=ALPHA)
    rate = fixed_horizon_promotions(rule, (0.5, 0.5), 150, seed=0)  # looks at the first 100
    # two-sided at alpha: about alpha / 2 of A/A tests come out "better"; never more than alpha
    assert 0.01 < rate <= ALPHA + 0.01, rate


def aa_stream(rng: random.Random, rate: float, per_arm: int) -> list[tuple[int, float]]:
    """Two arms of the same rate, arriving in a random interleaving."""
    arms = [0] * per_arm + [1] * per_arm
    rng.shuffle(arms)
    return [(arm, float(rng.random() < rate)) for arm in arms]


def naive_peeking_promotes(events: list[tuple[int, float]], burn_in: int) -> bool:
    """A z-test after every value, stopping at the first p < alpha: what the rule prevents."""
    counts, successes = [0, 0], [0.0, 0.0]
    for arm, value in events:
        counts[arm] += 1
        successes[arm] += value
        if min(counts) < burn_in:
            continue
        z = stats.pooled_proportion_z((successes[0], counts[0]), (successes[1], counts[1]))
        if z is not None and 2 * stats.upper_tail(abs(z)) < ALPHA:
            return z > 0
    return False


def test_sequential_rule_holds_alpha_under_continuous_peeking_where_naive_peeking_does_not():
    rule = PromotionConfig(
        min_samples_per_arm=20, max_samples_per_arm=300, peek=True, alpha=ALPHA, min_effect=0.1
    )
    rng = random.Random(1)
    sequential = naive = 0
    for _ in range(SIMULATIONS):
        events = aa_stream(rng, 0.5, 300)
        result = promotion.sequential(events, rule, True, ALPHA)
        sequential += result["decision"] == promotion.PROMOTE
        naive += naive_peeking_promotes(events, 20)
    assert sequential / SIMULATIONS <= ALPHA + 0.01, sequential / SIMULATIONS
    # the same data, looked at as often with a fixed-horizon test: false wins well above alpha
    assert naive / SIMULATIONS > 2 * ALPHA, naive / SIMULATIONS


def test_sequential_rule_stops_early_on_a_real_difference():
    rule = PromotionConfig(min_samples_per_arm=20, max_samples_per_arm=2000, peek=True)
    rng = random.Random(2)
    arms = [0, 1] * 2000
    events = [(arm, float(rng.random() < (0.5 if arm == 0 else 0.7))) for arm in arms]
    result = promotion.sequential(events, rule, True, ALPHA)
    assert result["decision"] == promotion.PROMOTE
    assert result["stopped_at"][1] < 400 and result["p"] < ALPHA
    assert result["ci"][0] > 0 and result["e_value"] >= 1 / ALPHA


def test_power_at_the_minimum_effect_matches_the_analytic_value():
    rule = PromotionConfig(min_samples_per_arm=200, min_effect=0.1, alpha=ALPHA)
    # two-sided at alpha: the "better" side rejects at alpha / 2
    analytic = stats.power_two_proportions(0.5, 0.1, 200, ALPHA / 2)
    simulated = fixed_horizon_promotions(rule, (0.5, 0.6), 200, seed=3)
    assert 0.4 < analytic < 0.7  # a test where power is neither 0 nor 1
    assert abs(simulated - analytic) <= 0.05, (simulated, analytic)
    needed = stats.samples_for_power(0.5, 0.1, ALPHA / 2, 0.8)
    assert stats.power_two_proportions(0.5, 0.1, needed, ALPHA / 2) >= 0.8
    assert stats.power_two_proportions(0.5, 0.1, needed - 1, ALPHA / 2) < 0.8


def binomial(n: int, rate: float) -> list[float]:
    return [math.comb(n, k) * rate**k * (1 - rate) ** (n - k) for k in range(n + 1)]


def wald(successes: int, n: int) -> tuple[float, float]:
    p = successes / n
    half = 1.959963984540054 * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


@pytest.mark.parametrize("rate", [0.02, 0.5, 0.98])
def test_intervals_keep_their_coverage_at_the_edges(rate):
    """Exact coverage (every outcome of 40 per arm, weighted by its probability), not a
    simulation's estimate of it."""
    n = 40
    chances = binomial(n, rate)

    def covered(interval, value) -> bool:
        return interval[0] <= value + 1e-12 and value - 1e-12 <= interval[1]

    wilson = sum(
        p for k, p in enumerate(chances) if covered(stats.wilson_interval(k, n, 0.95), rate)
    )
    newcombe = sum(
        p1 * p2
        for k1, p1 in enumerate(chances)
        for k2, p2 in enumerate(chances)
        if covered(stats.newcombe_interval((k1, n), (k2, n), 0.95), 0.0)
    )
    assert wilson >= 0.94 and newcombe >= 0.94, (wilson, newcombe)
    if rate != 0.5:  # what the normal interval does there: it collapses to a point
        normal = sum(p for k, p in enumerate(chances) if covered(wald(k, n), rate))
        assert normal < 0.9, normal


def test_forty_of_forty_against_none_is_not_reported_as_certain():
    _, low, high = ab.mean_interval([1.0] * 40, binary=True)
    assert high == 1.0 and 0.85 < low < 0.95
    result = ab.difference([0.0] * 40, [1.0] * 40, binary=True)
    assert result["diff"] == 1.0 and result["diff_ci_high"] == 1.0
    assert 0.8 < result["diff_ci_low"] < 0.95, result


def ab_traffic(seed: int, rate_a: float, rate_b: float, per_arm: int):
    """Trace rows and thumbs of an A/B test whose users like A and B at the given rates."""
    rng = random.Random(seed)
    rows, feedback = [], []
    for index in range(2 * per_arm):
        variant = "AB"[index % 2]
        request_id = f"r{index}"
        rows.append({"request_id": request_id, "variant": variant, "time": float(index)})
        up = rng.random() < (rate_a if variant == "A" else rate_b)
        entry = {"request_id": request_id, "time": index + 0.5, "thumbs": int(up)}
        feedback.append(entry | {"score": float(up)})
    return rows, feedback


def judged(rule: PromotionConfig, rows, feedback, table=None) -> dict:
    registered = {"rule": asdict(rule), "control": "A", "variants": ["A", "B"]}
    monitor = SimpleNamespace(format="none")
    return promotion.judge(registered, rows, feedback, table or [], monitor)


@pytest.mark.parametrize("peek", [False, True])
def test_a_better_variant_is_promoted_and_an_indifferent_user_promotes_nothing(peek):
    rule = PromotionConfig(min_samples_per_arm=100, max_samples_per_arm=400, peek=peek)
    decision = judged(rule, *ab_traffic(4, 0.4, 0.75, 400))
    assert decision["decision"] == promotion.PROMOTE and decision["winner"] == "B"
    assert decision["ci"][0] > 0 and decision["p"] < ALPHA
    # thumbs at random, whatever the answer: keep (or, peeking, no crossing yet)
    indifferent = judged(rule, *ab_traffic(5, 0.5, 0.5, 400))
    assert indifferent["decision"] in (promotion.KEEP, promotion.UNDECIDED)
    assert indifferent["winner"] != "B"
    too_few = judged(rule, *ab_traffic(4, 0.4, 0.75, 50))
    assert too_few["decision"] == promotion.UNDECIDED and too_few["winner"] is None


def test_a_guard_keeps_a_better_but_slower_variant():
    rule = PromotionConfig(min_samples_per_arm=100, max_latency_ratio=1.5)
    table = [
        {"variant": "A", "latency_ms_p90": 100.0, "cost_usd_p50": 1.0},
        {"variant": "B", "latency_ms_p90": 200.0, "cost_usd_p50": 1.0},
    ]
    decision = judged(rule, *ab_traffic(4, 0.4, 0.75, 400), table)
    assert decision["decision"] == promotion.KEEP
    assert "p90 latency 2.00x the control's (limit 1.5x)" in decision["comparisons"][0]["reason"]


def test_the_fixed_horizon_looks_once_however_much_traffic_follows():
    rule = PromotionConfig(min_samples_per_arm=100)
    rows, feedback = ab_traffic(6, 0.5, 0.5, 400)
    first = judged(rule, rows[:200], feedback[:200])["comparisons"][0]
    later = judged(rule, rows, feedback)["comparisons"][0]
    assert first["p"] == later["p"] and first["effect"] == later["effect"]


def test_the_rule_is_registered_once_and_a_changed_one_is_refused(tmp_path):
    rule = PromotionConfig()
    path = promotion.register_rule(rule, ["A", "B"], tmp_path)
    stored = json.loads(path.read_text())
    assert stored["rule"]["metric"] == "thumbs_up_rate" and stored["control"] == "A"
    promotion.register_rule(rule, ["A", "B"], tmp_path)  # a restarted serve: the same rule
    with pytest.raises(ConfigError, match="registered another rule") as error:
        promotion.register_rule(PromotionConfig(min_effect=0.2), ["A", "B"], tmp_path)
    assert str(path) in str(error.value)
    assert json.loads(path.read_text()) == stored  # the first registration stands


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("metric", "clicks", "serving.ab.promotion.metric: 'clicks' is not one of"),
        ("alpha", 0.7, "serving.ab.promotion.alpha"),
        ("min_samples_per_arm", 5, "serving.ab.promotion.min_samples_per_arm"),
        ("max_samples_per_arm", 50, "serving.ab.promotion.max_samples_per_arm"),
        ("max_latency_ratio", 0.0, "serving.ab.promotion.max_latency_ratio"),
    ],
)
def test_a_bad_rule_is_refused_naming_its_key(field, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        PromotionConfig(**{field: value}).check()
