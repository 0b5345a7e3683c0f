"""Human pairwise labels: the items people judge, and the durable store of their votes.

An item is a prompt and two answers, `x` and `y` (from models `model_x` and `model_y`, when
known). The labelling page shows them in an order drawn per labeller and item ("xy": x on
the left as A; "yx": y as A), so position says nothing about the model; a vote is A, B, tie or
both_bad as shown, stored together with the order and so also as the winner among x and y.

Votes live in SQLite (`votes.sqlite`), one row per vote: labeller, time, item id, order shown,
choice, winner, reason. Each vote is its own committed transaction with `synchronous=FULL`, so
a vote that was answered "recorded" survives a crash of the page's process or of the machine.
A labeller votes once per item (a unique key): a vote sent again after a lost answer (the page
retries across a restart) is answered "already recorded" and stored once.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError, DataError
from lmstack.util.sqlite import read_rows

VOTES_DB_NAME = "votes.sqlite"
ITEMS_FILE_NAME = "label_items.jsonl"
CHOICES = ("A", "B", "tie", "both_bad")
ORDERS = ("xy", "yx")
LABELLER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    x: str
    y: str
    model_x: str = ""
    model_y: str = ""


def item_id(prompt: str, x: str, y: str, model_x: str, model_y: str) -> str:
    text = json.dumps([prompt, x, y, model_x, model_y], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def arena_items(prompts: list[str], answers: dict[str, list[str]], names: list[str]) -> list[Item]:
    """The arena's pairing: every pair of models on every prompt (as eval=arena battles)."""

    items = []
    for a, b in combinations(names, 2):
        for index, prompt in enumerate(prompts):
            x, y = answers[a][index], answers[b][index]
            items.append(Item(item_id(prompt, x, y, a, b), prompt, x, y, a, b))
    return items


def load_pairs_jsonl(path: str | Path) -> list[Item]:
    """A jsonl of {prompt, answer_a, answer_b} rows, optional model_a, model_b and id."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"label.items: no file '{path}'")
    items: list[Item] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, x, y = (str(row[key]) for key in ("prompt", "answer_a", "answer_b"))
            model_x, model_y = str(row.get("model_a", "")), str(row.get("model_b", ""))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(
                f"{path}:{number}: a labelling row needs prompt, answer_a and answer_b "
                f"(optional model_a, model_b, id) ({type(error).__name__}: {error})"
            ) from None
        given = str(row.get("id") or item_id(prompt, x, y, model_x, model_y))
        items.append(Item(given, prompt, x, y, model_x, model_y))
    if not items:
        raise DataError(f"{path}: no labelling rows")
    check_unique(items, str(path))
    return items


def check_unique(items: list[Item], where: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{where}: item id '{item.id}' appears twice (ids must be unique)")
        seen.add(item.id)


def save_items(items: list[Item], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in items))
    tmp.replace(path)


def read_items(path: Path) -> list[Item]:
    return [Item(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- what each labeller sees


def order_shown(labeller: str, item: str) -> str:
    """ "xy" or "yx": fixed per labeller and item (a reload shows the same page), and
    independent of the models, so the left side is no hint."""
    digest = hashlib.sha256(f"{labeller}\x00{item}".encode()).digest()
    return ORDERS[digest[0] & 1]


def labeller_sequence(items: list[Item], labeller: str) -> list[Item]:
    """Every item, in an order of the labeller's own (position in the session is no hint)."""
    sequence = list(items)
    random.Random(f"label-order\x00{labeller}").shuffle(sequence)
    return sequence


def winner_of(choice: str, order: str) -> str:
    """The choice as shown (A = left) as the item's side: x, y, tie or both_bad."""
    if choice in ("tie", "both_bad"):
        return choice
    left, right = order[0], order[1]
    return left if choice == "A" else right


# ---------------------------------------------------------------- the store


VOTES_SQL = """
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    labeller TEXT NOT NULL,
    time REAL NOT NULL,
    item_id TEXT NOT NULL,
    order_shown TEXT NOT NULL,
    choice TEXT NOT NULL,
    winner TEXT NOT NULL,
    reason TEXT NOT NULL,
    UNIQUE (labeller, item_id)
)
"""


class VoteStore:
    """Append-only, durable votes; safe from many threads (one connection, one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # every commit reaches the disk before the vote is answered "recorded"
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(VOTES_SQL)
        self._db.commit()

    def add(self, labeller: str, item: str, order: str, choice: str, reason: str = "") -> bool:
        """True when stored; False when this labeller had already voted on this item."""
        row = (labeller, time.time(), item, order, choice, winner_of(choice, order), reason)
        with self._lock:
            try:
                with self._db:
                    self._db.execute(
                        "INSERT INTO votes (labeller, time, item_id, order_shown, choice, "
                        "winner, reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
            except sqlite3.IntegrityError:
                return False
        return True

    def voted_items(self, labeller: str) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT item_id FROM votes WHERE labeller = ?", (labeller,))
            return {item for (item,) in rows}

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT labeller, COUNT(*) FROM votes GROUP BY labeller")
            return dict(rows.fetchall())

    def total(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM votes").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_votes(path: str | Path) -> list[dict[str, Any]]:
    """Every vote of a store, oldest first."""
    path = Path(path)
    try:
        return read_rows(path, "SELECT * FROM votes ORDER BY id")
    except sqlite3.Error as error:
        raise DataError(f"{path}: not a readable vote store ({error})") from None


# ---------------------------------------------------------------- reading a session back


@dataclass
class Session:
    """A labelling session's items and votes (what eval=arena and eval=calibration read)."""

    items: dict[str, Item]
    votes: list[dict[str, Any]]
    source: Path


def is_session(spec: str | Path) -> bool:
    """A phase=label run directory, its votes.sqlite, or a copy of it with its items beside it;
    not any SQLite file (a serve run's traces.sqlite is not a labelling session)."""
    path = Path(spec)
    if (path / VOTES_DB_NAME).is_file():
        return True
    beside_items = (path.parent / ITEMS_FILE_NAME).is_file()
    return path.is_file() and (
        path.name == VOTES_DB_NAME or (path.suffix == ".sqlite" and beside_items)
    )


def open_session(spec: str | Path, key: str) -> Session:
    """A phase=label run directory, or its votes.sqlite (label_items.jsonl beside it)."""
    path = Path(spec)
    db = path / VOTES_DB_NAME if path.is_dir() else path
    items_path = db.parent / ITEMS_FILE_NAME
    if not db.is_file() or not items_path.is_file():
        raise ConfigError(
            f"{key}: '{spec}' is not a labelling session (a phase=label run directory, or its "
            f"{VOTES_DB_NAME} with {ITEMS_FILE_NAME} beside it)"
        )
    items = {item.id: item for item in read_items(items_path)}
    votes = [vote for vote in read_votes(db) if vote["item_id"] in items]
    if not votes:
        raise DataError(f"{key}: the labelling session {db} holds no votes yet")
    return Session(items, votes, db)


def human_battles(session: Session, key: str) -> list[tuple[str, str, float]]:
    """One battle per vote (model x, model y, score of x); both_bad counts as a tie, as in
    Chatbot Arena."""
    score = {"x": 1.0, "y": 0.0, "tie": 0.5, "both_bad": 0.5}
    battles = []
    for vote in session.votes:
        item = session.items[vote["item_id"]]
        if not (item.model_x and item.model_y):
            raise DataError(
                f"{key}: item '{item.id}' in {session.source.parent} names no models "
                "(model_a, model_b), so its votes cannot rate models"
            )
        battles.append((item.model_x, item.model_y, score[vote["winner"]]))
    return battles


def majority_label(winners: list[str]) -> str:
    """x, y or tie: the side most votes picked; a split vote or both_bad is a tie."""
    x, y = winners.count("x"), winners.count("y")
    return "x" if x > y else "y" if y > x else "tie"


def calibration_rows(session: Session) -> list[dict[str, Any]]:
    """The voted items as a labelled set for judge calibration: {question, x, y, label}, the
    label being the majority of the item's votes (split or both_bad: tie)."""
    winners: dict[str, list[str]] = {}
    for vote in session.votes:
        winners.setdefault(vote["item_id"], []).append(vote["winner"])
    return [
        {
            "question": item.prompt,
            "x": item.x,
            "y": item.y,
            "label": majority_label(winners[item.id]),
            "item_id": item.id,
            "human_votes": winners[item.id],
        }
        for item in session.items.values()
        if item.id in winners
    ]
