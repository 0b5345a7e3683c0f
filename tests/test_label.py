"""phase=label: the blind labelling page in a real headless Chromium, the vote store, bad input.

The page is the real `run.py phase=label` in a subprocess; two labellers vote in two windows
of Debian's chromium (driven by its chromedriver, nothing downloaded); the server is killed
(SIGKILL) mid-session and started again with the same command; every vote must be in the
store exactly once. The test saves a screenshot of the page (a laptop-sized window).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from lmstack.evaluation.votes import (
    VOTES_DB_NAME,
    order_shown,
    read_votes,
    winner_of,
)

from conftest import REPO, run_cli, run_dirs, run_one

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
XSS = (
    '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> '
    "[click me](javascript:window.__pwned=3)"
)
PAIRS = [
    {
        "prompt": "Ann has 3 apples and gets 4 more. How many apples does Ann have?",
        "answer_a": "3 + 4 = 7. The answer is 7.",
        "answer_b": "Ann has **3** apples. The answer is 3.",
    },
    {
        "prompt": "Write a Python function that adds two numbers.",
        "answer_a": "```python\ndef add(a, b):\n    return a + b\n```\n\nIt returns the *sum*.",
        "answer_b": "Use `a - b`:\n\n```python\ndef add(a, b):\n    return a - b\n```",
    },
    {"prompt": "Show me some HTML.", "answer_a": XSS, "answer_b": "`<b>bold</b>` is bold."},
    {
        "prompt": "List three primes.",
        "answer_a": "- 2\n- 3\n- 5",
        "answer_b": "1. 4\n2. 6\n3. 8",
    },
    {
        "prompt": "Tom has 9 pears and gives away 2. How many pears does Tom have?",
        "answer_a": "9 - 2 = 7. The answer is 7.",
        "answer_b": "9 + 2 = 11. The answer is 11.",
    },
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_pairs(path: Path, rows: list[dict]) -> Path:
    rows = [{**row, "model_a": "good", "model_b": "bad"} for row in rows]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class LabelPage:
    """`python run.py phase=label ...` as a user starts it (and a crash kills it)."""

    def __init__(self, output_dir: Path, *overrides: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.command = [
            sys.executable,
            str(REPO / "run.py"),
            "phase=label",
            f"label.port={self.port}",
            "logger=none",
            f"paths.output_dir={output_dir}",
            *overrides,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log = output_dir / "label.log"
        self.process: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                self.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        # generous: a page over arena items may first build the built-in base (minutes on a
        # cold cache); a process that dies fails at once below
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"the labelling page did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to clean up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def browser(scratch: Path):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        if os.environ.get("LMSTACK_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium-driver)")
        pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1366,860",  # a laptop screen
    ):
        options.add_argument(argument)
    # Chromium leaves a singleton folder in TMPDIR at exit: give it one the test removes (short:
    # the folder holds a Unix socket, whose path may not exceed 107 bytes)
    service = Service(CHROMEDRIVER, env={**os.environ, "TMPDIR": str(scratch)})
    return webdriver.Chrome(service=service, options=options)


def shown_item(driver) -> str:
    return driver.execute_script("return document.body.dataset.item || ''")


def wait_until(condition, timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def press(driver, key: str) -> str:
    """Vote with a keyboard shortcut; returns the item voted on (the next one is then shown)."""
    from selenium.webdriver.common.action_chains import ActionChains

    before = shown_item(driver)
    ActionChains(driver).send_keys(key).perform()
    return before


def give_reason(driver, text: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(driver).send_keys("r").perform()  # focuses the reason box
    ActionChains(driver).send_keys(text).perform()  # letters typed there vote for nothing
    assert driver.find_element("id", "reason").get_attribute("value") == text
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()


def click(driver, choice: str) -> str:
    from selenium.webdriver.common.by import By

    before = shown_item(driver)
    driver.find_element(By.CSS_SELECTOR, f'button[data-choice="{choice}"]').click()
    return before


def all_done(driver) -> bool:
    return driver.execute_script("return !document.getElementById('done').hidden")


def next_shown(driver, before: str, timeout_s: float = 40.0) -> None:
    wait_until(
        lambda: shown_item(driver) != before or all_done(driver),
        timeout_s,
        "the next item",
    )


KEYS = {"a": "A", "b": "B", "t": "tie", "x": "both_bad"}


def test_two_labellers_vote_through_a_crash_and_every_vote_is_stored_once(tmp_path):
    scratch = Path(tempfile.mkdtemp(prefix="lmstack-chromium-"))
    driver = browser(scratch)
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    page = LabelPage(tmp_path / "out", f"label.items={pairs}")
    sent: list[tuple[str, str, str]] = []  # (labeller, item, choice) as the test voted
    try:
        page.start()
        driver.get(f"{page.base}/?labeller=alice")
        alice = driver.current_window_handle
        wait_until(lambda: shown_item(driver), what="alice's first item")
        driver.switch_to.new_window("window")
        bob = driver.current_window_handle
        driver.get(f"{page.base}/?labeller=bob")
        wait_until(lambda: shown_item(driver), what="bob's first item")

        def vote(window: str, how: str) -> None:
            driver.switch_to.window(window)
            labeller = "alice" if window == alice else "bob"
            item = press(driver, how) if how in KEYS else click(driver, how)
            sent.append((labeller, item, KEYS.get(how, how)))
            next_shown(driver, item)

        check_no_script_ran(driver, page)
        vote(alice, "a")
        vote(bob, "B")
        check_no_script_ran(driver, page)
        driver.switch_to.window(alice)
        give_reason(driver, "same answer, different words")  # R, type, Esc: then the key votes
        reasoned = shown_item(driver)
        vote(alice, "t")
        vote(bob, "both_bad")
        driver.switch_to.window(alice)
        progress = driver.find_element("id", "count").text
        assert progress == f"2 of {len(PAIRS)}", progress
        wait_until(lambda: "bob 2" in driver.find_element("id", "who").text, 10, "bob's count")
        save_screenshot(driver, tmp_path)

        # the crash: the server dies; alice votes while it is down; it comes back
        page.kill()
        item = press(driver, "b")
        sent.append(("alice", item, "B"))
        wait_until(lambda: "retrying" in status_text(driver), what="the page to notice")
        page.start()
        next_shown(driver, item)
        assert "Reconnected" in status_text(driver) or "Saved" in status_text(driver)

        # bob's page was open all along; both finish their items
        for window, keys in ((bob, "abt"), (alice, "xa")):
            for key in keys:
                vote(window, key)
        for window in (alice, bob):
            driver.switch_to.window(window)
            wait_until(lambda: all_done(driver), what="the end page")
    finally:
        driver.quit()
        shutil.rmtree(scratch, ignore_errors=True)
        page.stop()

    (run_dir,) = run_dirs(tmp_path / "out")
    stored = read_votes(run_dir / VOTES_DB_NAME)
    pairs_voted = Counter((v["labeller"], v["item_id"]) for v in stored)
    assert len(stored) == 2 * len(PAIRS) and set(pairs_voted.values()) == {1}
    assert sorted((v["labeller"], v["item_id"], v["choice"]) for v in stored) == sorted(sent)
    reasons = {v["item_id"]: v["reason"] for v in stored if v["labeller"] == "alice"}
    assert reasons[reasoned] == "same answer, different words"
    assert sum(bool(reason) for reason in reasons.values()) == 1
    for vote in stored:
        assert vote["order_shown"] == order_shown(vote["labeller"], vote["item_id"])
        assert vote["winner"] == winner_of(vote["choice"], vote["order_shown"])
        assert vote["time"] > 0


def status_text(driver) -> str:
    return driver.find_element("id", "status").text


def check_no_script_ran(driver, page: LabelPage) -> None:
    """The item with <script>, <img onerror> and a javascript: link: shown as text, inert."""
    text = driver.find_element("id", "task").text
    if "Show me some HTML" in text:
        assert "<script>window.__pwned = 1</script>" in text
        assert driver.find_elements("css selector", "#task img, #task script") == []
        links = driver.find_elements("css selector", "#task a")
        assert all("javascript" not in (a.get_attribute("href") or "") for a in links)
    assert driver.execute_script("return window.__pwned === undefined")


def save_screenshot(driver, tmp_path: Path) -> None:
    path = tmp_path / "label_page.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    # the record in the repository: made once, renewed on request (a test run that rewrote a
    # tracked file every time would leave every checkout changed)
    record = REPO / "docs" / "label_page.png"
    if not record.exists() or os.environ.get("LMSTACK_UPDATE_SCREENSHOTS"):
        shutil.copy(path, record)


def test_bad_input_is_a_4xx_and_the_store_is_unchanged(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS[:2])
    page = LabelPage(
        tmp_path / "out",
        f"label.items={pairs}",
        "label.token_env=LABEL_TOKEN",
        env={"LABEL_TOKEN": "s3cret"},
    )
    try:
        page.start()
        key = {"X-Lmstack-Token": "s3cret"}
        first = httpx.get(f"{page.base}/api/next?labeller=carol", headers=key).json()["item"]
        cases = [
            ("GET", "/", None, {}, 401, "token"),
            ("GET", "/?token=wrong", None, {}, 403, "wrong access token"),
            ("POST", "/api/vote", {"labeller": "carol"}, {}, 401, "token"),
            ("POST", "/api/vote", b"{not json", key, 400, "body: not JSON"),
            ("POST", "/api/vote", [1, 2], key, 400, "JSON object"),
            ("POST", "/api/vote", {"labeller": "carol", "item_id": "nope", "choice": "A"}, key,
             404, "item_id: no item 'nope'"),
            ("POST", "/api/vote", {"labeller": "carol", "item_id": first["id"], "choice": "C"},
             key, 400, "choice: 'C'"),
            ("POST", "/api/vote", {"labeller": "a b", "item_id": first["id"], "choice": "A"}, key,
             400, "labeller"),
            ("GET", "/api/next", None, key, 400, "labeller"),
            ("POST", "/api/other", {}, key, 404, "no endpoint"),
        ]  # fmt: skip
        for method, path, body, headers, status, fragment in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            answer = httpx.request(method, page.base + path, content=content, headers=headers)
            assert answer.status_code == status, (path, body, answer.text)
            assert fragment in answer.json()["error"], (fragment, answer.text)
        # still serving; a good vote is taken, and taken once
        good = {"labeller": "carol", "item_id": first["id"], "choice": "A"}
        answers = [
            httpx.post(f"{page.base}/api/vote", json=good, headers=key).json() for _ in range(2)
        ]
        assert [a["recorded"] for a in answers] == [True, False]
        page_answer = httpx.get(f"{page.base}/?token=s3cret")
        assert page_answer.status_code == 200
        assert "script-src 'nonce-" in page_answer.headers["content-security-policy"]
    finally:
        page.stop()
    (run_dir,) = run_dirs(tmp_path / "out")
    assert [(v["labeller"], v["choice"]) for v in read_votes(run_dir / VOTES_DB_NAME)] == [
        ("carol", "A")
    ]
    assert json.loads((run_dir / "label_summary.json").read_text())["label/votes"] == 1


@pytest.mark.slow  # two models load and answer, twice (~1 min on 2 busy cores)
def test_arena_items_pair_every_model_on_every_prompt_with_models_hidden(tmp_path, tiny_random):
    """label.items=arena: the eval.arena models answer (in process); the page names no model.
    Then eval=arena rates the same models by the verifier and by the votes, reported apart."""
    page = LabelPage(
        tmp_path / "out",
        f"eval.arena.models=[base,{tiny_random}]",
        "eval.arena.num_prompts=3",
        "eval.max_new_tokens=8",
    )
    try:
        page.start()
        seen = set()
        for _ in range(3):
            answer = httpx.get(f"{page.base}/api/next?labeller=dan").json()
            assert answer["total"] == 3  # one pair of models x 3 prompts
            assert "base" not in json.dumps(answer) and tiny_random.name not in json.dumps(answer)
            seen.add(answer["item"]["id"])
            vote = {"labeller": "dan", "item_id": answer["item"]["id"], "choice": "both_bad"}
            assert httpx.post(f"{page.base}/api/vote", json=vote).json()["recorded"]
        assert len(seen) == 3
    finally:
        page.stop()
    (run_dir,) = run_dirs(tmp_path / "out")
    items = votes_items(run_dir)
    assert {(i.model_x, i.model_y) for i in items} == {("base", tiny_random.name)}
    assert all(" has " in i.prompt for i in items)  # the arena's arithmetic prompts

    eval_dir, metrics = run_one(
        "phase=eval",
        "eval=arena",
        f"eval.arena.models=[base,{tiny_random}]",
        "eval.arena.num_prompts=3",
        f"eval.arena.human_votes={run_dir}",
        "eval.arena.bootstrap_rounds=50",
        "logger=none",
        output_dir=tmp_path / "eval",
    )
    assert metrics["arena/battles"] == 3 and metrics["arena/human/battles"] == 3
    assert all(row["ties"] == 3 for row in metrics["arena/human/leaderboard"])  # both bad
    assert metrics["arena/human/both_bad"] == 3
    text = (eval_dir / "arena.md").read_text()
    assert "## verifier" in text and "## human" in text


def votes_items(run_dir: Path):
    from lmstack.evaluation.votes import ITEMS_FILE_NAME, read_items

    return read_items(run_dir / ITEMS_FILE_NAME)


def test_a_malformed_items_file_names_its_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "no answers"}\n')
    result = run_cli(
        "phase=label", f"label.items={pairs}", "logger=none", output_dir=tmp_path, check=False
    )
    assert result.returncode == 2
    assert f"{pairs}:2: a labelling row needs prompt, answer_a and answer_b" in result.stderr
