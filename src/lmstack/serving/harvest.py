"""Served traffic and its feedback as training rows: what phase=harvest writes.

From one or more trace stores (the gateway's, serving/traces.py):
1. every answered request with the latest feedback on it (thumbs or a score), filtered by
   time, variant, prompt version, engine and user; warm-ups, errors, redacted texts and
   unrated requests are left out and counted;
2. personal data scrubbed from prompts and answers (lmstack.data.pii), counted per rule;
3. split into train and held-out by user (requests without a user id: by prompt) or by prompt,
   a seeded hash of the unit; a train request whose prompt is held out is dropped, so no user
   and no prompt is on both sides;
4. rows in the formats the objectives take (TRL's): kto {prompt, completion, label}; preference
   {prompt, chosen, rejected}, per prompt the best- against the worst-rated different answer
   (from an A/B test's variants, or repeated samples), and the labelling page's majority votes;
   sft {messages}, answers rated at or above min_score. Chat prompts stay conversational.
A rating is the user's latest feedback, or, with harvest.scorers, every answer's score by a
reward model, a reference scorer or a judge (the phase builds the scorer: `score`).
The data card (data_card.json/.md) holds the counts per source and label, what each filter
and the de-duplication removed, the label balance, and the lineage: the stores, the served
run ids and the range of trace times and ids.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmstack.config.groups.harvest import HarvestConfig
from lmstack.data.pii import Scrubber
from lmstack.errors import DataError
from lmstack.serving.traces import (
    REDACTED,
    WARMUP_TAG,
    check_schema_version,
    find_trace_dbs,
    read_feedback,
    read_traces,
)

FILTERS = ("time window", "variant", "prompt version", "engine", "user")


@dataclass
class Rated:
    """One answered request with its latest rating, as harvested."""

    prompt: Any  # a list of chat messages, or the prompt text
    prompt_hash: str
    response: str
    score: float
    good: bool  # score >= min_score
    user: str
    variant: str
    time: float
    store: str


# (prompts, responses) -> one score each: harvest.scorers, built by the phase
Score = Callable[[list[Any], list[str]], list[float]]


@dataclass
class Voted:
    """A labelling-page item with a majority: the answer people preferred and the other."""

    prompt: str
    chosen: str
    rejected: str
    votes: int
    session: str


@dataclass
class Harvest:
    rows: dict[str, dict[str, list[dict[str, Any]]]]  # kind -> split -> rows
    card: dict[str, Any] = field(default_factory=dict)


def harvest(
    config: HarvestConfig,
    stores: list[str],
    score: Score | None = None,
    voted: list[Voted] | tuple = (),
) -> Harvest:
    """Rows from the trace stores under `stores` (rated by feedback, or by `score`) and from
    labelling-page votes (`voted`: preference pairs)."""
    dbs = source_stores(stores, config.sources)
    removed: Counter[str] = Counter()
    scrubber = Scrubber(config.pii_rules) if config.pii else None
    rated, lineage = [], []
    for db in dbs:
        version = check_schema_version(db)
        traces, feedback = read_traces(db, include_warmup=True), read_feedback(db)
        if score is None:
            require_signal(db, traces, feedback, config.kinds)
        rated += rated_requests(db, traces, feedback, config, removed, score)
        lineage.append(store_lineage(db, version, traces, feedback))
    if scrubber is not None:
        rated = [scrubbed_request(r, scrubber) for r in rated]
        voted = [scrubbed_vote(v, scrubber) for v in voted]
    train, heldout, leaking = split(rated, config)
    removed["prompt also held out"] += leaking
    rows = {kind: {"train": [], "heldout": []} for kind in config.kinds}
    for name, part in (("train", train), ("heldout", heldout)):
        for kind in config.kinds:
            rows[kind][name] = BUILDERS[kind](part, config.dedup, removed)
    if "preference" in rows:
        for name, part in split_votes(list(voted), config).items():
            rows["preference"][name] += [vote_row(v) for v in part]
    card = data_card(config, rows, rated, removed, lineage, scrubber)
    card["rated_by"] = "harvest.scorers" if score is not None else "feedback"
    card["votes"] = vote_lineage(list(voted))
    return Harvest(rows, card)


def source_stores(stores: list[str], sources: list[str]) -> list[Path]:
    dbs: list[Path] = []
    for source in stores:
        index = sources.index(source) if source in sources else 0
        found = find_trace_dbs(source)
        if not found:
            raise DataError(
                f"harvest.sources[{index}]: {source} holds no trace store (traces.sqlite) "
                "and is not a labelling session (votes.sqlite)"
            )
        dbs += [db for db in found if db not in dbs]
    return dbs


def require_signal(db: Path, traces: list, feedback: list, kinds: list[str]) -> None:
    """Every kind is made from rated answers: a store without any feedback is named."""
    if not feedback:
        raise DataError(
            f"trace store {db}: no feedback ({len(traces)} traces, 0 ratings), so no "
            f"{', '.join(kinds)} rows: harvest.kinds are made from answers rated through "
            "POST /v1/feedback (thumbs or a score); serve with the gateway and send feedback, "
            "or score the answers with harvest.scorers (a reward model, a scorer, a judge)"
        )


def rated_requests(
    db: Path,
    traces: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    config: HarvestConfig,
    removed: Counter[str],
    score: Score | None,
) -> list[Rated]:
    """The store's answered requests that pass the filters, each with its rating: the latest
    feedback, or `score`'s (then unrated requests count too, and feedback is not read)."""
    latest = {entry["request_id"]: entry for entry in feedback}
    kept = []
    for row in traces:
        reason = left_out(row, latest, config, scored=score is not None)
        if reason:
            removed[reason] += 1
        else:
            kept.append(row)
    prompts = [parsed_prompt(row["prompt"]) for row in kept]
    responses = [row["response"] for row in kept]
    if score is not None:
        scores = [float(value) for value in score(prompts, responses)] if kept else []
    else:
        scores = [float(latest[row["request_id"]]["score"]) for row in kept]
    return [
        Rated(
            prompt=prompt,
            prompt_hash=row["prompt_hash"],
            response=response,
            score=value,
            good=value >= config.min_score,
            user=row.get("user") or "",
            variant=row.get("variant") or "",
            time=row["time"],
            store=str(db),
        )
        for row, prompt, response, value in zip(kept, prompts, responses, scores, strict=True)
    ]


def left_out(
    row: dict[str, Any], latest: dict[str, Any], config: HarvestConfig, scored: bool
) -> str:
    """Why a trace row gives no training row ("" when it does)."""
    if row["tag"] == WARMUP_TAG:
        return "warm-up request"
    if row["status"] >= 400 or row["error"]:
        return "failed request"
    if config.since is not None and row["time"] < config.since:
        return "time window"
    if config.until is not None and row["time"] >= config.until:
        return "time window"
    for name, allowed, value in (
        ("variant", config.variants, row.get("variant") or ""),
        ("prompt version", config.prompt_versions, row["prompt_version"]),
        ("engine", config.engines, row["engine"]),
        ("user", config.users, row.get("user") or ""),
    ):
        if allowed and value not in allowed:
            return name
    if REDACTED in (row["prompt"], row["response"]):
        return "redacted text"
    if not scored and row["request_id"] not in latest:
        return "no feedback"
    return ""


def parsed_prompt(stored: str) -> Any:
    """The messages of a chat request (the trace keeps them as JSON), else the prompt text."""
    try:
        value = json.loads(stored)
    except ValueError:
        return stored
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m.get("content") or ""} for m in value]
    return stored


def scrubbed(prompt: Any, scrubber: Scrubber) -> Any:
    if isinstance(prompt, str):
        return scrubber.scrub(prompt)
    return [m | {"content": scrubber.scrub(str(m["content"]))} for m in prompt]


def scrubbed_request(request: Rated, scrubber: Scrubber) -> Rated:
    return replace(
        request,
        prompt=scrubbed(request.prompt, scrubber),
        response=scrubber.scrub(request.response),
    )


def scrubbed_vote(vote: Voted, scrubber: Scrubber) -> Voted:
    return replace(
        vote,
        prompt=scrubber.scrub(vote.prompt),
        chosen=scrubber.scrub(vote.chosen),
        rejected=scrubber.scrub(vote.rejected),
    )


# ---- the split ----


def unit_of(request: Rated, split_by: str) -> str:
    if split_by == "user" and request.user:
        return f"user:{request.user}"
    return f"prompt:{request.prompt_hash}"


def held_out(unit: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\x00{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(requests: list[Rated], config: HarvestConfig) -> tuple[list[Rated], list[Rated], int]:
    """(train, held-out, train requests dropped because their prompt is held out)."""
    fraction, seed = config.heldout_fraction, config.seed
    marked = [(r, held_out(unit_of(r, config.split_by), seed, fraction)) for r in requests]
    heldout = [r for r, out in marked if out]
    heldout_prompts = {r.prompt_hash for r in heldout}
    train = [r for r, out in marked if not out]
    kept = [r for r in train if r.prompt_hash not in heldout_prompts]
    return kept, heldout, len(train) - len(kept)


def split_votes(voted: list[Voted], config: HarvestConfig) -> dict[str, list[Voted]]:
    """Voted items split by their prompt (an item has many labellers: no one user unit)."""
    parts: dict[str, list[Voted]] = {"train": [], "heldout": []}
    for vote in voted:
        unit = "prompt:" + hashlib.sha256(vote.prompt.encode()).hexdigest()
        out = held_out(unit, config.seed, config.heldout_fraction)
        parts["heldout" if out else "train"].append(vote)
    return parts


# ---- rows per kind ----


def as_completion(prompt: Any, response: str) -> Any:
    """The answer in the prompt's own form: an assistant message for chat, else text."""
    return response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]


def kto_rows(requests: list[Rated], dedup: bool, removed: Counter[str]) -> list[dict[str, Any]]:
    chosen = latest_by(requests, lambda r: (r.prompt_hash, r.response)) if dedup else requests
    removed["kto: repeated prompt and answer"] += len(requests) - len(chosen)
    return [
        {"prompt": r.prompt, "completion": as_completion(r.prompt, r.response), "label": r.good}
        for r in chosen
    ]


def sft_rows(requests: list[Rated], dedup: bool, removed: Counter[str]) -> list[dict[str, Any]]:
    good = [r for r in requests if r.good]
    if dedup:  # per prompt, the best-rated answer (the latest among equals)
        best: dict[str, Rated] = {}
        for r in sorted(good, key=lambda r: (r.score, r.time)):
            best[r.prompt_hash] = r
        removed["sft: repeated prompt"] += len(good) - len(best)
        good = list(best.values())
    return [{"messages": messages(r.prompt, r.response)} for r in good]


def messages(prompt: Any, response: str) -> list[dict[str, str]]:
    asked = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*asked, {"role": "assistant", "content": response}]


def preference_rows(
    requests: list[Rated], dedup: bool, removed: Counter[str]
) -> list[dict[str, Any]]:
    """Per prompt, the best- against the worst-rated answer, when their scores and texts
    differ; without dedup, every such pair of answers to a prompt."""
    by_prompt: dict[str, list[Rated]] = {}
    for r in requests:
        by_prompt.setdefault(r.prompt_hash, []).append(r)
    rows = []
    for answers in by_prompt.values():
        ranked = sorted(answers, key=lambda r: (r.score, r.time))
        pairs = [(ranked[-1], ranked[0])] if dedup else every_pair(ranked)
        for better, worse in pairs:
            if better.score > worse.score and better.response != worse.response:
                rows.append(preference_row(better, worse))
    return rows


def every_pair(ranked: list[Rated]) -> list[tuple[Rated, Rated]]:
    return [(b, w) for i, w in enumerate(ranked) for b in ranked[i + 1 :]]


def preference_row(better: Rated, worse: Rated) -> dict[str, Any]:
    source = "ab" if better.variant and better.variant != worse.variant else "samples"
    return {
        "prompt": better.prompt,
        "chosen": as_completion(better.prompt, better.response),
        "rejected": as_completion(better.prompt, worse.response),
        "source": source,
    }


def vote_row(vote: Voted) -> dict[str, Any]:
    return {
        "prompt": vote.prompt,
        "chosen": vote.chosen,
        "rejected": vote.rejected,
        "source": "votes",
    }


def latest_by(requests: list[Rated], key) -> list[Rated]:
    latest: dict[Any, Rated] = {}
    for r in sorted(requests, key=lambda r: r.time):
        latest[key(r)] = r
    return list(latest.values())


BUILDERS = {"kto": kto_rows, "preference": preference_rows, "sft": sft_rows}


# ---- the data card ----


def store_lineage(db: Path, version: int, traces: list, feedback: list) -> dict[str, Any]:
    times = [row["time"] for row in traces]
    return {
        "store": str(db),
        "schema_version": version,
        "traces": len(traces),
        "feedback": len(feedback),
        "trace_ids": [traces[0]["id"], traces[-1]["id"]] if traces else None,
        "trace_times": [min(times), max(times)] if times else None,
        "served_runs": sorted({row["run_id"] for row in traces if row["run_id"]}),
        "variants": sorted({row.get("variant") or "" for row in traces} - {""}),
    }


def vote_lineage(voted: list[Voted]) -> list[dict[str, Any]]:
    sessions = Counter(v.session for v in voted)
    votes = Counter()
    for v in voted:
        votes[v.session] += v.votes
    return [
        {"session": session, "items": items, "votes": votes[session]}
        for session, items in sorted(sessions.items())
    ]


def data_card(
    config: HarvestConfig,
    rows: dict[str, dict[str, list[dict[str, Any]]]],
    rated: list[Rated],
    removed: Counter[str],
    lineage: list[dict[str, Any]],
    scrubber: Scrubber | None,
) -> dict[str, Any]:
    counts = {
        kind: {name: len(part) for name, part in parts.items()} for kind, parts in rows.items()
    }
    labels = {
        name: Counter("good" if r["label"] else "bad" for r in part)
        for name, part in rows.get("kto", {}).items()
    }
    return {
        "rows": counts,
        "kto_labels": {name: dict(c) for name, c in labels.items()},
        "preference_sources": dict(
            Counter(r["source"] for part in rows.get("preference", {}).values() for r in part)
        ),
        "rated_requests": len(rated),
        "rated_per_store": dict(Counter(r.store for r in rated)),
        "users": len({r.user for r in rated if r.user}),
        "left_out": dict(removed),
        "pii_scrubbed": dict(scrubber.counts) if scrubber else "off",
        "split": {
            "by": config.split_by,
            "heldout_fraction": config.heldout_fraction,
            "seed": config.seed,
        },
        "filters": {
            "since": config.since,
            "until": config.until,
            "variants": config.variants,
            "prompt_versions": config.prompt_versions,
            "engines": config.engines,
            "users": config.users,
            "min_score": config.min_score,
            "dedup": config.dedup,
        },
        "lineage": lineage,
    }


def card_markdown(card: dict[str, Any]) -> str:
    lines = ["# Data card", "", "| kind | train | held-out |", "|---|---|---|"]
    for kind, splits in card["rows"].items():
        lines.append(f"| {kind} | {splits['train']} | {splits['heldout']} |")
    lines += [
        "",
        f"Rated requests: {card['rated_requests']} from {card['users']} users (rated by "
        f"{card.get('rated_by', 'feedback')}).",
    ]
    for session in card.get("votes") or []:
        lines.append(
            f"Labelling session {session['session']}: {session['items']} items with a "
            f"majority ({session['votes']} votes) as preference pairs."
        )
    if card["kto_labels"]:
        balance = ", ".join(f"{name}: {dict(c)}" for name, c in card["kto_labels"].items())
        lines.append(f"KTO labels: {balance}.")
    left = ", ".join(f"{reason} {n}" for reason, n in sorted(card["left_out"].items()) if n)
    lines += [f"Left out: {left or 'nothing'}.", f"PII scrubbed: {card['pii_scrubbed']}."]
    split_rule = card["split"]
    lines.append(
        f"Held out: {split_rule['heldout_fraction']} by {split_rule['by']} (seed "
        f"{split_rule['seed']}); no user or prompt is on both sides."
    )
    lines += ["", "## Lineage", "", "| store | traces | feedback | trace ids | served runs |"]
    lines.append("|---|---|---|---|---|")
    for source in card["lineage"]:
        ids = source["trace_ids"] or "-"
        runs = ", ".join(source["served_runs"]) or "-"
        cells = [source["store"], source["traces"], source["feedback"], ids, runs]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"
