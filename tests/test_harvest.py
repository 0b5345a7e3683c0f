"""phase=harvest: an A/B test's traffic through the real gateway (two small OpenAI-compatible
servers as the variants, users with ids, planted personal data, thumbs) becomes KTO,
preference and SFT rows, split by user with no user or prompt on both sides, with a data card;
a KTO run trains on them and records their lineage. Bad stores exit 2 naming the store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from test_ab import make_config, variant_server, variants_override

from lmstack.serving.traces import TRACE_DB_NAME

from conftest import CACHE_DIR, FAST, assert_rejected, run_cli, run_one

# sticky routing puts a user on one variant: enough users that both sides hold both
USERS = [f"u{index}" for index in range(24)]
SHARED = ["What is the capital of France?", "Name a prime number."]
PLANTED = "I am ann.lee@example.com, phone +1 415 555 0100, my key is sk-abcdefghijklmnop123456."


def ask(client: httpx.Client, user: str, prompt: str) -> tuple[str, str]:
    answer = client.post(
        "/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4},
        headers={"X-Lmstack-User": user},
    )
    assert answer.status_code == 200, answer.text
    return answer.headers["x-lmstack-request-id"], answer.headers["x-lmstack-variant"]


def serve_traffic(tmp_path: Path, feedback: bool = True) -> Path:
    """Each user asks two questions of their own and the shared ones; B's answers get thumbs
    up, A's down; the first user's question carries planted personal data."""
    from lmstack.serving.engines import serve

    db = tmp_path / "store" / TRACE_DB_NAME
    with variant_server("A") as url_a, variant_server("B") as url_b:
        config = make_config(
            variants_override("base_url", url_a, url_b), f"trace.path={db}", "logger=none"
        )
        with (
            serve(config, str(CACHE_DIR), tmp_path / "serving") as endpoint,
            httpx.Client(base_url=endpoint.base_url, timeout=30) as client,
        ):
            for user in USERS:
                own = [f"{user}: question {n}" for n in range(2)]
                if user == USERS[0]:
                    own[0] += " " + PLANTED
                for prompt in [*own, *SHARED]:
                    request_id, variant = ask(client, user, prompt)
                    if feedback:
                        thumbs = "up" if variant == "B" else "down"
                        body = {"request_id": request_id, "thumbs": thumbs}
                        assert client.post("/feedback", json=body).status_code == 200
    return db


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompt_text(row: dict) -> str:
    return row["prompt"][0]["content"] if "prompt" in row else row["messages"][0]["content"]


def users_of(rows: list[dict]) -> set[str]:
    return {prompt_text(row).split(":")[0] for row in rows if prompt_text(row) not in SHARED}


def test_traffic_becomes_split_scrubbed_rows_with_a_card_and_a_run_trains_on_them(tmp_path):
    db = serve_traffic(tmp_path)
    run_dir, metrics = run_one(
        "phase=harvest",
        f"harvest.sources=[{db.parent}]",
        "harvest.kinds=[kto,preference,sft]",
        "harvest.heldout_fraction=0.3",
        "logger=none",
        output_dir=tmp_path / "harvest",
    )
    rows = {
        (kind, part): read_jsonl(run_dir / f"{kind}.{part}.jsonl")
        for kind in ("kto", "preference", "sft")
        for part in ("train", "heldout")
    }
    card = json.loads((run_dir / "data_card.json").read_text())
    kto = rows["kto", "train"] + rows["kto", "heldout"]
    assert all(set(row) == {"prompt", "completion", "label"} for row in kto)
    assert all(row["label"] == (row["completion"][0]["content"] == "I am B.") for row in kto)
    assert card["kto_labels"]["train"]["good"] > 0 and card["kto_labels"]["train"]["bad"] > 0
    # no user and no prompt on both sides
    for kind in ("kto", "sft", "preference"):
        train, heldout = rows[kind, "train"], rows[kind, "heldout"]
        assert not {prompt_text(r) for r in train} & {prompt_text(r) for r in heldout}, kind
        assert not users_of(train) & users_of(heldout), kind
    assert users_of(rows["kto", "heldout"]) and users_of(rows["kto", "train"])
    # a shared prompt answered by both variants is a pair: B's answer chosen
    pairs = rows["preference", "train"] + rows["preference", "heldout"]
    assert pairs and all(r["chosen"][0]["content"] == "I am B." for r in pairs)
    assert all(r["rejected"][0]["content"] == "I am A." and r["source"] == "ab" for r in pairs)
    assert all(r["messages"][-1]["content"] == "I am B." for r in rows["sft", "train"])
    # planted personal data: scrubbed, and counted
    everything = json.dumps([r for part in rows.values() for r in part])
    assert "ann.lee@example.com" not in everything and "sk-abcdef" not in everything
    assert "415 555" not in everything and "[email]" in everything
    assert card["pii_scrubbed"] == {"email": 1, "phone": 1, "api_key": 1}
    (source,) = card["lineage"]
    assert source["store"] == str(db) and source["feedback"] == len(USERS) * 4
    assert metrics["harvest/kto/train_rows"] == len(rows["kto", "train"])
    assert "## Lineage" in (run_dir / "data_card.md").read_text()
    # a filter: B's answers only, all of them liked
    only_b, _ = run_one(
        "phase=harvest",
        f"harvest.sources=[{db}]",
        "harvest.variants=[B]",
        "harvest.heldout_fraction=0",
        "logger=none",
        output_dir=tmp_path / "only-b",
    )
    filtered = json.loads((only_b / "data_card.json").read_text())
    assert filtered["kto_labels"]["train"] == {"good": filtered["rows"]["kto"]["train"]}
    assert filtered["left_out"]["variant"] > 0 and filtered["rows"]["kto"]["heldout"] == 0

    trained, _ = run_one(
        *FAST,
        "objective=kto",
        "data.source=jsonl",
        f"data.path={run_dir / 'kto.train.jsonl'}",
        f"data.eval_path={run_dir / 'kto.heldout.jsonl'}",
        "logger=none",
        "trainer.max_steps=2",
        output_dir=tmp_path / "train",
    )
    lineage = json.loads((trained / "lineage.json").read_text())
    assert lineage["harvest_run"] == str(run_dir.resolve())
    assert lineage["sources"][0]["store"] == str(db)


def test_a_store_without_feedback_or_of_an_unknown_version_exits_2_naming_it(tmp_path):
    db = serve_traffic(tmp_path, feedback=False)
    result = run_cli(
        "phase=harvest", f"harvest.sources=[{db}]", output_dir=tmp_path / "out", check=False
    )
    assert_rejected(result, f"trace store {db}: no feedback", "kto")
    with sqlite3.connect(db) as connection:
        connection.execute("PRAGMA user_version = 99")
    result = run_cli(
        "phase=harvest", f"harvest.sources=[{db}]", output_dir=tmp_path / "out", check=False
    )
    assert_rejected(result, f"trace store {db}: schema version 99 is unknown")


def labelling_session(folder: Path) -> Path:
    """A phase=label session's files: three items, voted 2-1 for x, 2-0 for y, and 1-1."""
    from lmstack.evaluation import votes

    folder.mkdir(parents=True)
    items = [
        votes.Item(f"i{n}", f"Question {n}? Mail bob@example.org", f"x{n}", f"y{n}", "a", "b")
        for n in range(3)
    ]
    votes.save_items(items, folder / votes.ITEMS_FILE_NAME)
    store = votes.VoteStore(folder / votes.VOTES_DB_NAME)
    ballots = {"i0": ["x", "x", "y"], "i1": ["y", "y"], "i2": ["x", "y"]}
    for item, winners in ballots.items():
        for labeller, winner in enumerate(winners):
            # order "xy" shows x as A, so choice A is a vote for x
            store.add(f"l{labeller}", item, "xy", "A" if winner == "x" else "B")
    store.close()
    return folder


def test_unrated_traffic_scored_by_harvest_scorers_and_votes_make_preference_pairs(tmp_path):
    """No feedback: the answers are rated by a scorer (B's answers match the format), so the
    shared prompts answered by both variants make pairs; a labelling session's majority votes
    are pairs too (a split vote is none), scrubbed like the traffic."""
    db = serve_traffic(tmp_path, feedback=False)
    session = labelling_session(tmp_path / "label")
    run_dir, _ = run_one(
        "phase=harvest",
        f"harvest.sources=[{db},{session}]",
        "harvest.kinds=[preference,kto]",
        "harvest.heldout_fraction=0",
        "harvest.scorers=[{name: format, pattern: 'I am B'}]",
        "logger=none",
        output_dir=tmp_path / "out",
    )
    rows = read_jsonl(run_dir / "preference.train.jsonl")
    by_source = {source: [r for r in rows if r["source"] == source] for source in ("ab", "votes")}
    assert len(by_source["ab"]) == len(SHARED)
    assert all(r["chosen"][0]["content"] == "I am B." for r in by_source["ab"])
    assert sorted((r["chosen"], r["rejected"]) for r in by_source["votes"]) == [
        ("x0", "y0"),
        ("y1", "x1"),
    ]
    assert all("[email]" in r["prompt"] for r in by_source["votes"])
    card = json.loads((run_dir / "data_card.json").read_text())
    assert card["rated_by"] == "harvest.scorers" and card["votes"][0]["items"] == 2
    labels = [r["label"] for r in read_jsonl(run_dir / "kto.train.jsonl")]
    assert 0 < sum(labels) < len(labels)  # B's answers up, A's down, by the scorer alone


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("harvest.scorers=[{name: exact}]", "harvest.references"),
        ("harvest.kinds=[thumbs]", "harvest.kinds[0]: 'thumbs' is not one of"),
        ("harvest.split_by=session", "harvest.split_by"),
        ("harvest.heldout_fraction=1.0", "harvest.heldout_fraction"),
        ("+harvest.pii_rules.card='[0-9'", "harvest.pii_rules.card: not a regular expression"),
    ],
)
def test_bad_harvest_settings_exit_2_naming_the_key(tmp_path, override, fragment):
    result = run_cli(
        "phase=harvest", "harvest.sources=[x]", override, output_dir=tmp_path, check=False
    )
    assert_rejected(result, fragment)


def test_harvest_without_sources_names_the_key(tmp_path):
    result = run_cli("phase=harvest", output_dir=tmp_path, check=False)
    assert_rejected(result, "harvest.sources")


def test_bench_is_a_traffic_source_with_users_and_a_scripted_users_thumbs(tiny_base, tmp_path):
    """phase=bench with bench.users and bench.feedback=correct: each request carries a user
    id, and each answer gets a thumb through the gateway saying whether its number is right;
    the harvest of that store labels the same answers the same way."""
    from lmstack.data.arith import extract_answer, problems
    from lmstack.serving.traces import read_feedback, read_traces

    bench = [
        "phase=bench",
        f"serving.model={tiny_base}",
        "bench.num_requests=12",
        "bench.max_tokens=16",
        "bench.ignore_eos=false",
        "bench.users=3",
        "bench.feedback=correct",
        "logger=none",
    ]
    run_dir, metrics = run_one(*bench, output_dir=tmp_path / "bench")
    references = [p.answer for p in problems(14, 0, held_out=True)][2:]  # after 2 warm-ups
    sent = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
    right = [extract_answer(r["text"]) == answer for r, answer in zip(sent, references)]
    traces = read_traces(run_dir / TRACE_DB_NAME)
    assert {row["user"] for row in traces} == {"user-0", "user-1", "user-2"}
    thumbs = {row["request_id"]: row["thumbs"] for row in read_feedback(run_dir / TRACE_DB_NAME)}
    assert [thumbs[r["request_id"]] for r in sent] == [int(ok) for ok in right]
    assert metrics["bench/feedback_given"] == 12
    assert metrics["bench/thumbs_up_rate"] == pytest.approx(sum(right) / 12)
    # (the base is rarely right: the rules' own verdicts are checked below, on set answers)

    harvested, _ = run_one(
        "phase=harvest", f"harvest.sources=[{run_dir}]", "harvest.heldout_fraction=0",
        "logger=none", output_dir=tmp_path / "harvest",
    )  # fmt: skip
    assert harvested.name.startswith("harvest-")
    labels = sorted(
        (row["prompt"][-1]["content"], row["completion"][0]["content"], row["label"])
        for row in read_jsonl(harvested / "kto.train.jsonl")
    )
    by_id = {row["request_id"]: row for row in traces}
    asked = [json.loads(by_id[r["request_id"]]["prompt"])[-1]["content"] for r in sent]
    assert labels == sorted(set(zip(asked, [r["text"] for r in sent], right)))


def test_the_scripted_users_rules():
    import random
    from types import SimpleNamespace

    from lmstack.serving.scripted_user import likes

    def user(rule: str, **fields) -> SimpleNamespace:
        defaults = {"feedback_key": "answer", "feedback_regex": "", "feedback_rate": 0.5}
        return SimpleNamespace(feedback=rule, **(defaults | fields))

    rng = random.Random(0)
    assert likes("3 + 4 = 7. The answer is 7.", "7", user("correct"), rng)
    assert not likes("3 + 4 = 8. The answer is 8.", "7", user("correct"), rng)
    assert not likes("I cannot say.", "7", user("correct"), rng)
    assert likes('{"answer": 7}', None, user("json_key"), rng)
    assert not likes('{"result": 7}', None, user("json_key"), rng)
    assert not likes("answer: 7", None, user("json_key"), rng)
    assert likes('```json\n{"answer": "Paris"}\n```', None, user("json_key"), rng)
    assert not likes('See:\n```json\n{"answer": 1}\n```', None, user("json_key"), rng)
    assert likes("Sure! 7", None, user("regex", feedback_regex=r"^Sure"), rng)
    assert not likes("7", None, user("regex", feedback_regex=r"^Sure"), rng)
    ups = sum(likes("anything", None, user("random", feedback_rate=0.3), rng) for _ in range(2000))
    assert 0.27 < ups / 2000 < 0.33
